"""perf_analyzer helpers: install NVIDIA's load client from the tritonclient 2.51.0 wheel, write BYTES input data,
run it against our ensembles and parse its CSV.

    python -m clip_loadtest.perf install
    python -m clip_loadtest.perf run encode_image -u localhost:8000 --concurrency 1 8 16
    python -m clip_loadtest.perf run encode_text -i grpc -u localhost:8001 --text "a photo of a cat"
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import logging
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from clip_build.files import PinnedWheelError, pinned_wheel, project_root
from clip_common.contract import ENSEMBLES as PUBLIC_ENSEMBLES
from clip_common.contract import EncodeImage, EncodeText, ZeroShot

log = logging.getLogger(__name__)

# Later wheels lack the binary or need a newer glibc; the PyPI "perf-analyzer" package is an empty placeholder.
WHEEL_VERSION = "2.51.0"
WHEEL_NAME = f"tritonclient-{WHEEL_VERSION}-py3-none-manylinux1_x86_64.whl"
WHEEL_SHA256 = "c485bb0123bdf310f90bc8b03d3489b28df2ffed55b30c7eee0b795b48113d52"
WHEEL_MEMBER = f"tritonclient-{WHEEL_VERSION}.data/data/bin/perf_analyzer"
# plain soname -> glob of the hashed copy that nvidia-pytriton's wheel ships in nvidia_pytriton.libs
LIBS = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}


class PerfError(RuntimeError):
    """perf_analyzer could not be installed, or a run failed."""


def default_tools_dir() -> Path:
    """`.artifacts/tools` in the checkout (ignored by git), else in the working directory."""
    return (project_root() or Path.cwd()) / ".artifacts" / "tools"


def _pytriton_libs() -> Path:
    from clip_server.binary import TritonServerError, libs_dir

    try:
        libs = libs_dir()
    except TritonServerError as exc:
        raise PerfError(f"{exc}: it ships libb64 and libcudart that perf_analyzer needs") from None
    if not libs.is_dir():
        raise PerfError(f"{libs} not found (nvidia-pytriton wheel layout changed?)")
    return libs


def install_perf_analyzer(tools_dir: Path | None = None, *, force: bool = False) -> Path:
    """Install perf_analyzer into tools_dir/bin (libs into tools_dir/lib); return the binary's path."""
    tools = Path(tools_dir) if tools_dir else default_tools_dir()
    binary, libdir = tools / "bin" / "perf_analyzer", tools / "lib"
    if binary.is_file() and all((libdir / name).exists() for name in LIBS) and not force:
        return binary
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise PerfError(f"perf_analyzer from the {WHEEL_NAME} wheel runs on linux x86_64 only")
    binary.parent.mkdir(parents=True, exist_ok=True)
    libdir.mkdir(parents=True, exist_ok=True)
    try:
        wheel = pinned_wheel(
            f"tritonclient=={WHEEL_VERSION}",
            WHEEL_NAME,
            WHEEL_SHA256,
            tools,
            pip_args=("--platform", "manylinux1_x86_64", "--python-version", "3"),
        )
    except PinnedWheelError as exc:
        raise PerfError(str(exc)) from None
    with zipfile.ZipFile(wheel) as zf, zf.open(WHEEL_MEMBER) as src, open(f"{binary}.tmp", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.chmod(f"{binary}.tmp", 0o755)
    os.replace(f"{binary}.tmp", binary)
    libs = _pytriton_libs()
    for name, pattern in LIBS.items():
        found = sorted(libs.glob(pattern))
        if not found:
            raise PerfError(f"{pattern} not found in {libs}")
        link = libdir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(found[0])
    check = subprocess.run([str(binary), "--version"], capture_output=True, text=True, env=perf_env(tools))
    if "error while loading shared libraries" in check.stderr:
        raise PerfError(f"perf_analyzer cannot start: {check.stderr.strip()}")
    log.info("perf_analyzer installed at %s", binary)
    return binary


def perf_env(tools_dir: Path | None = None) -> dict[str, str]:
    """Environment for perf_analyzer: our lib folder first on LD_LIBRARY_PATH."""
    tools = Path(tools_dir) if tools_dir else default_tools_dir()
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(tools / "lib"), env.get("LD_LIBRARY_PATH")]))
    return env


# ---- input data (perf_analyzer's --input-data JSON) ---------------------------------------------------------------
def _bytes_b64(items: Sequence[bytes]) -> str:
    """A BYTES tensor as perf_analyzer's "b64": Triton's serialisation (4-byte LE length + bytes per element)."""
    return base64.b64encode(b"".join(struct.pack("<I", len(b)) + b for b in items)).decode("ascii")


def _bytes_tensor(items: Sequence[bytes]) -> dict:
    return {"b64": _bytes_b64(items), "shape": [len(items), 1]}


def text_input_data(texts: Iterable[str], batch: int = 1) -> dict:
    """encode_text requests of `batch` texts each ([batch, 1]); perf_analyzer cycles through them."""
    texts = list(texts)
    steps = [texts[i : i + batch] for i in range(0, len(texts) - batch + 1, batch)] or [texts]
    return {"data": [{EncodeText.TEXT: _bytes_tensor([t.encode("utf-8") for t in step])} for step in steps]}


def image_input_data(images: Iterable[bytes], batch: int = 1) -> dict:
    """encode_image requests of `batch` encoded images each ([batch, 1])."""
    images = list(images)
    steps = [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)] or [images]
    return {"data": [{EncodeImage.IMAGE: _bytes_tensor(step)} for step in steps]}


def zero_shot_input_data(labels: Sequence[str], images: Iterable[bytes], top_k: int = 5) -> dict:
    """zero_shot requests: every label against one image per request."""
    label_tensor = _bytes_tensor([t.encode("utf-8") for t in labels])
    return {
        "data": [
            {
                ZeroShot.TEXT: label_tensor,
                ZeroShot.IMAGE: _bytes_tensor([img]),
                ZeroShot.TOP_K: {"content": [int(top_k)], "shape": [1]},
            }
            for img in images
        ]
    }


# ---- running ------------------------------------------------------------------------------------------------------
@dataclass
class PerfRow:
    """One concurrency level of perf_analyzer's CSV (latencies in microseconds)."""

    concurrency: int
    throughput: float  # requests/s (perf_analyzer's "Inferences/Second" with batch 1 = requests/s)
    p50_us: float
    p90_us: float
    p95_us: float
    p99_us: float
    queue_us: float
    compute_infer_us: float
    raw: dict


def parse_csv(path: Path) -> list[PerfRow]:
    """Rows of perf_analyzer's `-f` CSV."""
    rows = []
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            num = {k: float(v) for k, v in rec.items() if k and v not in (None, "")}
            rows.append(
                PerfRow(
                    concurrency=int(num.get("Concurrency", 0)),
                    throughput=num.get("Inferences/Second", 0.0),
                    p50_us=num.get("p50 latency", 0.0),
                    p90_us=num.get("p90 latency", 0.0),
                    p95_us=num.get("p95 latency", 0.0),
                    p99_us=num.get("p99 latency", 0.0),
                    queue_us=num.get("Server Queue", 0.0),
                    compute_infer_us=num.get("Server Compute Infer", 0.0),
                    raw=num,
                )
            )
    return rows


def run_perf_analyzer(
    model: str,
    url: str,
    input_data: dict | Path,
    *,
    protocol: str = "http",
    concurrency: Sequence[int] = (1,),
    measurement_ms: int = 3000,
    stability: int = 999,
    max_trials: int = 5,
    extra_args: Sequence[str] = (),
    tools_dir: Path | None = None,
    timeout_s: float = 600.0,
    workdir: Path | None = None,
) -> list[PerfRow]:
    """Run perf_analyzer on `model` at each concurrency; return its parsed CSV rows.

    stability 999 (default) turns perf_analyzer's stability gate off: it reports the mean of its last 3 windows.
    On a shared CPU the gate otherwise fails ("Failed to obtain stable measurement") and no CSV is written.
    A level that fails is logged and skipped; PerfError only when every level failed.
    """
    binary = install_perf_analyzer(tools_dir)
    url = url.split("://", 1)[-1]
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        if isinstance(input_data, dict):
            data_path = Path(tmp) / "input.json"
            data_path.write_text(json.dumps(input_data))
        else:
            data_path = Path(input_data)
        out_csv = Path(tmp) / "out.csv"
        rows: list[PerfRow] = []
        failures: list[str] = []
        cmd = [
            str(binary),
            "-m",
            model,
            "-u",
            url,
            "-i",
            protocol,
            "--input-data",
            str(data_path),
            "--measurement-interval",
            str(measurement_ms),
            "--stability-percentage",
            str(stability),
            "--max-trials",
            str(max_trials),
            "-f",
            str(out_csv),
        ]
        for c in concurrency:  # one run per level: a level that cannot stabilise still yields the others
            cmd_c = cmd + ["--concurrency-range", str(c), *extra_args]
            log.debug("%s", " ".join(cmd_c))
            try:
                done = subprocess.run(cmd_c, capture_output=True, text=True, env=perf_env(tools_dir), timeout=timeout_s)
            except subprocess.TimeoutExpired as exc:
                raise PerfError(f"perf_analyzer timed out after {timeout_s:.0f}s on {model} c={c}") from exc
            if done.returncode != 0 or not out_csv.is_file():
                tail = (done.stdout + done.stderr).strip().splitlines()[-6:]
                failures.append(f"c={c} (rc {done.returncode}): " + " | ".join(tail))
                log.warning("perf_analyzer failed on %s %s", model, failures[-1])
                continue
            rows.extend(parse_csv(out_csv))
            out_csv.unlink()
    if failures and not rows:
        raise PerfError(f"perf_analyzer failed on {model}: " + "; ".join(failures))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clip_loadtest.perf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    inst = sub.add_parser("install", help="install perf_analyzer into .artifacts/tools")
    inst.add_argument("--tools-dir", type=Path, default=None)
    inst.add_argument("--force", action="store_true")
    run = sub.add_parser("run", help="run perf_analyzer against one of our ensembles")
    run.add_argument("model", choices=list(PUBLIC_ENSEMBLES))
    run.add_argument("-u", "--url", default="localhost:8000")
    run.add_argument("-i", "--protocol", choices=["http", "grpc"], default="http")
    run.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    run.add_argument("--batch", type=int, default=1, help="items per request")
    run.add_argument("--text", action="append", help="text(s) to send (default: short prompts)")
    run.add_argument("--image-sizes", type=int, nargs="+", default=[224, 320, 480, 640])
    run.add_argument("--measurement-ms", type=int, default=3000)
    run.add_argument("--tools-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "install":
            print(install_perf_analyzer(args.tools_dir, force=args.force))
            return 0
        from . import workload as bench_data

        texts = args.text or bench_data.short_prompts(64)
        images = bench_data.jpeg_images(16, sizes=args.image_sizes)
        if args.model == EncodeText.NAME:
            data = text_input_data(texts, args.batch)
        elif args.model == EncodeImage.NAME:
            data = image_input_data(images, args.batch)
        else:
            data = zero_shot_input_data(bench_data.LABELS, images)
        rows = run_perf_analyzer(
            args.model,
            args.url,
            data,
            protocol=args.protocol,
            concurrency=args.concurrency,
            measurement_ms=args.measurement_ms,
            tools_dir=args.tools_dir,
        )
    except PerfError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'queue ms':>9}")
    for r in rows:
        print(
            f"{r.concurrency:>4} {r.throughput:>9.2f} {r.p50_us / 1e3:>8.2f} {r.p95_us / 1e3:>8.2f} "
            f"{r.p99_us / 1e3:>8.2f} {r.queue_us / 1e3:>9.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
