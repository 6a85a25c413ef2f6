"""Soak test: mixed Locust load (loadtest/locustfile.py) plus a trickle of bad inputs for N minutes, while the
server's and its stubs' resident memory is sampled.

    python -m clip_loadtest.soak --minutes 3                      # synthetic ViT-B/32-size CLIP: build, serve, soak
    python -m clip_loadtest.soak --minutes 30 --weights W         # your converted weights
    python -m clip_loadtest.soak --minutes 10 --repository R      # a built repository
    python -m clip_loadtest.soak --minutes 10 --url 127.0.0.1:8000 --server-pid PID   # a running server

Goals printed at the end: 0 failed Locust requests, every bad input refused as INVALID_ARG (never a 5xx, never a
success), all models ready with no dead stub at the end, RSS growth < 5% from the end of the warm-up to the end
(taken as the median of the last samples, so a single allocator spike does not decide). Exit code 0 when met.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from clip_common.contract import EncodeImage, EncodeText

log = logging.getLogger(__name__)

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


def bad_inputs() -> list[tuple[str, str, bytes]]:
    """(ensemble, input, item) that must each be refused with INVALID_ARG."""
    import struct
    import zlib

    import numpy as np
    from PIL import Image

    def png(w: int, h: int) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b"")
        )

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    jpeg = buf.getvalue()
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "ICO")
    return [
        (EncodeImage.NAME, EncodeImage.IMAGE, b""),
        (EncodeImage.NAME, EncodeImage.IMAGE, b"not an image at all"),
        (EncodeImage.NAME, EncodeImage.IMAGE, jpeg[: len(jpeg) // 2]),
        (EncodeImage.NAME, EncodeImage.IMAGE, png(50000, 50000)),
        (EncodeImage.NAME, EncodeImage.IMAGE, buf.getvalue()),
        (EncodeText.NAME, EncodeText.TEXT, b"caf\xc3("),
        (EncodeText.NAME, EncodeText.TEXT, b"a" * 20000),
    ]


class BadTraffic(threading.Thread):
    """Sends bad inputs at `rps` over HTTP; counts proper refusals (HTTP 400) and anything else."""

    def __init__(self, url: str, rps: float, stop: threading.Event):
        super().__init__(name="soak-bad", daemon=True)
        self.url, self.rps, self.stop = url, rps, stop
        self.refused = 0
        self.unexpected: list[str] = []

    def run(self) -> None:
        import numpy as np
        import tritonclient.http as httpclient
        from tritonclient.utils import InferenceServerException

        items = bad_inputs()
        client = httpclient.InferenceServerClient(self.url, network_timeout=60)
        k = 0
        while not self.stop.wait(1.0 / self.rps):
            model, name, item = items[k % len(items)]
            k += 1
            t = httpclient.InferInput(name, [1, 1], "BYTES")
            t.set_data_from_numpy(np.array([[item]], dtype=object))
            try:
                client.infer(model, [t])
                self.unexpected.append(f"{model} item {k % len(items)}: succeeded")
            except InferenceServerException as exc:
                msg = exc.message() or ""
                if str(exc.status()) == "400" and "Traceback" not in msg:
                    self.refused += 1
                else:
                    self.unexpected.append(f"[{exc.status()}] {msg[:200]}")
            except Exception as exc:  # noqa: BLE001 - transport errors count as unexpected
                self.unexpected.append(f"{type(exc).__name__}: {exc}")
                client = httpclient.InferenceServerClient(self.url, network_timeout=60)
        client.close()


class RssSampler(threading.Thread):
    """Samples the resident memory of a process tree (server + stubs) every `every` seconds."""

    def __init__(self, rss_fn, every: float, stop: threading.Event):
        super().__init__(name="soak-rss", daemon=True)
        self.rss_fn, self.every, self.stop = rss_fn, every, stop
        self.samples: list[tuple[float, int]] = []
        self.t0 = time.monotonic()

    def run(self) -> None:
        while True:
            try:
                self.samples.append((time.monotonic() - self.t0, int(self.rss_fn())))
            except Exception as exc:  # noqa: BLE001 - a failed sample is logged; sampling goes on
                log.warning("rss sample failed: %s", exc)
            if self.stop.wait(self.every):
                return


def tree_rss(pid: int) -> int:
    import psutil

    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def rss_growth(samples: list[tuple[float, int]], warmup: float, tail: int = 3) -> dict:
    """RSS at the end of the warm-up vs at the end (median of the last `tail` samples each side)."""
    after = [s for s in samples if s[0] >= warmup]
    if len(after) < 2:
        return {"note": "too few samples after warm-up"}
    start = statistics.median(r for _t, r in after[:tail])
    end = statistics.median(r for _t, r in after[-tail:])
    return {
        "rss_after_warmup_mib": round(start / 2**20, 1),
        "rss_end_mib": round(end / 2**20, 1),
        "rss_max_mib": round(max(r for _t, r in after) / 2**20, 1),
        "growth_pct": round(100.0 * (end - start) / start, 2),
        "samples": len(samples),
    }


def build_synthetic(workdir: Path, weights: Path | None) -> Path:
    """WEIGHTS_DIR (given, or a random ViT-B/32-size CLIP) -> a built repository under workdir."""
    from clip_build.repository import build_repository

    if weights is None:
        from clip_build.convert import convert
        from clip_build.synthetic import make_random_checkpoint

        weights = workdir / "weights"
        if not (weights / "manifest.json").is_file():
            log.info("making a random ViT-B/32-size CLIP checkpoint and converting it")
            convert(str(make_random_checkpoint(workdir / "checkpoint", "clip", size="base")), weights)
    return build_repository(weights, workdir / "repository")


def run_locust(host: str, minutes: float, users: int, out: Path, extra: list[str]) -> tuple[int, dict, str]:
    prefix = out / "locust"
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        host,
        "-u",
        str(users),
        "-r",
        str(users),
        "-t",
        f"{int(minutes * 60)}s",
        "--only-summary",
        "--csv",
        str(prefix),
        *extra,
    ]
    log.info("running %s", " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=out)
    stats = {}
    try:
        with open(f"{prefix}_stats.csv", newline="") as f:
            for row in csv.DictReader(f):
                stats[row["Name"]] = row
    except FileNotFoundError:
        pass
    return done.returncode, stats, (done.stdout + done.stderr)[-4000:]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m clip_loadtest.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--url", default=None, help="HTTP host:port of a running server (default: build and serve)")
    ap.add_argument("--server-pid", type=int, default=None, help="with --url: tritonserver pid, for RSS sampling")
    ap.add_argument("--repository", type=Path, default=None, help="serve this built repository")
    ap.add_argument("--weights", type=Path, default=None, help="build from this WEIGHTS_DIR")
    ap.add_argument("--workdir", type=Path, default=None, help="where builds, logs and reports go (default: temp)")
    ap.add_argument("--protocol", choices=("http", "grpc"), default="http", help="Locust's protocol")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--mix", default="text=3,image=2,zero_shot=1")
    ap.add_argument("--image-sizes", default="224x224,320x240,640x480,1024x768")
    ap.add_argument("--bad-rps", type=float, default=2.0, help="bad inputs per second next to the load (0: none)")
    ap.add_argument("--warmup", type=float, default=30.0, help="seconds excluded from the RSS growth")
    ap.add_argument("--sample-every", type=float, default=5.0, help="RSS sampling period, seconds")
    ap.add_argument("--max-growth-pct", type=float, default=5.0)
    return ap


def _start_target(args: argparse.Namespace, workdir: Path):
    """(server started here or None, HTTP host:port, gRPC host:port or None, RSS function or None)."""
    if args.url:
        rss_fn = (lambda: tree_rss(args.server_pid)) if args.server_pid else None
        return None, args.url, None, rss_fn
    from clip_server import TritonServer

    repo = args.repository or build_synthetic(workdir, args.weights)
    server = TritonServer(repo, log_path=workdir / "tritonserver.log", exit_timeout=10)
    server.start()
    log.info("server ready in %.1fs", server.wait_ready())
    return server, server.http_url, server.grpc_url, server.rss_bytes


def _run_load(args: argparse.Namespace, host: str, http_url: str, rss_fn, workdir: Path):
    """Locust for --minutes with the RSS sampler and the bad-input trickle beside it: (exit code, stats, output tail,
    sampler or None, bad traffic or None, elapsed seconds)."""
    stop = threading.Event()
    sampler = RssSampler(rss_fn, args.sample_every, stop) if rss_fn else None
    bad = BadTraffic(http_url, args.bad_rps, stop) if args.bad_rps > 0 else None
    for t in (sampler, bad):
        if t:
            t.start()
    started = time.monotonic()
    try:
        code, stats, tail = run_locust(
            host, args.minutes, args.users, workdir, ["--mix", args.mix, "--image-sizes", args.image_sizes]
        )
    finally:
        stop.set()
        for t in (sampler, bad):
            if t:
                t.join(30)
    return code, stats, tail, sampler, bad, time.monotonic() - started


def _summary(args: argparse.Namespace, code: int, stats: dict, bad: BadTraffic | None, elapsed: float) -> dict:
    """The soak's result from Locust's aggregated and per-ensemble stats and the bad-input counts."""
    agg = stats.get("Aggregated", {})
    return {
        "minutes": args.minutes,
        "protocol": args.protocol,
        "users": args.users,
        "mix": args.mix,
        "locust_exit_code": code,
        "requests": int(agg.get("Request Count", 0) or 0),
        "failures": int(agg.get("Failure Count", 0) or 0),
        "rps": round(float(agg.get("Requests/s", 0) or 0), 1),
        "p50_ms": agg.get("50%"),
        "p95_ms": agg.get("95%"),
        "p99_ms": agg.get("99%"),
        "per_ensemble": {
            k: {"requests": int(v["Request Count"]), "failures": int(v["Failure Count"]), "p95_ms": v.get("95%")}
            for k, v in stats.items()
            if k != "Aggregated"
        },
        "bad_inputs_refused": bad.refused if bad else 0,
        "bad_inputs_unexpected": (bad.unexpected[:10] if bad else []),
        "bad_inputs_unexpected_count": len(bad.unexpected) if bad else 0,
        "elapsed_s": round(elapsed, 1),
    }


def _passed(result: dict, max_growth_pct: float) -> bool:
    """No failure, some requests, every bad input refused cleanly, the server healthy, RSS growth under the limit."""
    return (
        result["failures"] == 0
        and result["requests"] > 0
        and result["bad_inputs_unexpected_count"] == 0
        and not result.get("models_not_ready")
        and not result.get("dead_stubs")
        and ("rss" not in result or result["rss"].get("growth_pct", 0.0) < max_growth_pct)
    )


def _report(result: dict, code: int, tail: str, workdir: Path) -> None:
    """soak.json in workdir; the summary (without the RSS samples) and one verdict line on stdout."""
    (workdir / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: v for k, v in result.items() if k != "rss_samples_mib"}
    print(json.dumps(summary, indent=2))
    if code != 0 and result["failures"] == 0:
        print(tail, file=sys.stderr)
    print(
        f"soak {'PASS' if result['pass'] else 'FAIL'}: {result['requests']} requests, {result['failures']} failures, "
        f"{result['bad_inputs_refused']} bad inputs refused ({result['bad_inputs_unexpected_count']} unexpected), "
        f"RSS growth {result.get('rss', {}).get('growth_pct', 'n/a')}%  -> {workdir / 'soak.json'}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="clip-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    server, http_url, grpc_url, rss_fn = _start_target(args, workdir)
    if args.protocol == "grpc" and grpc_url is None:
        ap.error("--protocol grpc needs the server started here (or pass an HTTP --url and --protocol http)")
    host = f"http://{http_url}" if args.protocol == "http" else f"grpc://{grpc_url}"

    code, stats, tail, sampler, bad, elapsed = _run_load(args, host, http_url, rss_fn, workdir)
    result = _summary(args, code, stats, bad, elapsed)
    if sampler:
        result["rss"] = rss_growth(sampler.samples, args.warmup)
        result["rss_samples_mib"] = [(round(t), round(r / 2**20, 1)) for t, r in sampler.samples]
    if server is not None:
        result["models_not_ready"] = server.not_ready_models()
        result["dead_stubs"] = server.dead_stubs()
        server.stop()
    result["pass"] = _passed(result, args.max_growth_pct)
    _report(result, code, tail, workdir)
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
