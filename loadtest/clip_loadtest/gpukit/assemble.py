"""`make gpu-kit`: one folder holding everything the GPU machine lacks, within the device tool's 64 MiB.

    python -m clip_loadtest.gpukit.assemble --out .artifacts/gpu-kit [--python 3.12]

<out>/run_kit.py    the launcher (standard library only; see `launcher`)
<out>/kit.json      what is inside: versions, sizes, the archive's sha256
<out>/kit.tar.xz    server/  tritonserver, the libraries it loads, the python backend and the stub for one Python
                             version, in the nvidia-pytriton wheel's layout; ELF files stripped
                    tools/   perf_analyzer (tritonclient 2.51.0 wheel), its two libraries linked into server/
                    site/    tritonclient's gRPC client (Python code; the HTTP client needs gevent) and python-rapidjson
                             built for that Python (the device image has grpcio, protobuf, numpy, packaging)
                    stub-site/ numpy 1.26 for the python backend stubs only: Triton 24.10's stub (pybind11 < 2.12)
                             misreads numpy 2 arrays (seen here: BYTES inputs crash the stub, FP32 outputs come back
                             empty), and the device image has numpy 2
                    src/     our packages; model_repository/ the template; cache/clip_bpe CLIP's BPE vocabulary
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

from clip_build.files import cache_dir, pinned_wheel, sha256_file
from clip_build.repository import template_dir
from clip_build.synthetic import clip_bpe_files
from clip_server.binary import libs_dir, triton_root

from .. import perf

log = logging.getLogger(__name__)

LIMIT_MIB = 64  # the device tool's limit for the working tree and every carried path together
DEFAULT_MAX_MIB = 60  # what the kit may take of it (the checkout travels too)
PACKAGES = ("clip_common", "clip_client", "clip_runtime", "clip_build", "clip_server", "clip_loadtest")
LAUNCHER = Path(__file__).resolve().parent / "launcher.py"
# python-rapidjson (tritonclient.grpc imports it) for each Python a kit can target: exact files, PyPI's sha256.
RAPIDJSON_VERSION = "1.25"
RAPIDJSON = {
    "3.11": (
        "python_rapidjson-1.25-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        "d2975f036913143206ab034c90b888cf16a1b40440011b2e8ebedfb95e07d089",
    ),
    "3.12": (
        "python_rapidjson-1.25-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        "d425190a9cc78f46f897d0efceddc094048ea08d584340a5830f48e186607f9c",
    ),
}
# numpy < 2 for the stubs, per Python a kit can target.
NUMPY_VERSION = "1.26.4"
NUMPY = {
    "3.11": (
        "numpy-1.26.4-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "666dbfb6ec68962c033a450943ded891bed2d54e6755e35e5835d63f4f6931d5",
    ),
    "3.12": (
        "numpy-1.26.4-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "675d61ffbfa78604709862923189bad94014bef562cc35cf61d3a07bba02a7ed",
    ),
}
NUMPY_SKIP = {"tests", "distutils", "f2py", "include"}  # folders `import numpy` never loads
_LDD_LINE = re.compile(r"^\s*(\S+) => (\S+) \(0x[0-9a-f]+\)$")


class KitError(RuntimeError):
    """The kit could not be assembled, or it would not fit."""


def _copy_tree(src: Path, dst: Path, keep=lambda p: True) -> None:
    """Copy the files of src under dst (no __pycache__), those `keep(relative path)` accepts."""
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_file() and "__pycache__" not in rel.parts and keep(rel):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dst / rel)


def loaded_libraries(elf_files: list[Path], libs: Path) -> set[Path]:
    """The files of `libs` the dynamic loader maps for these executables and libraries (ldd: the whole closure)."""
    if shutil.which("ldd") is None:
        raise KitError("ldd not found: it lists the libraries the server loads")
    env = dict(os.environ, LD_LIBRARY_PATH=str(libs))
    found: set[Path] = set()
    for elf in elf_files:
        done = subprocess.run(["ldd", str(elf)], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise KitError(f"ldd {elf} failed: {done.stderr.strip()}")
        for line in done.stdout.splitlines():
            m = _LDD_LINE.match(line)
            if m and Path(m.group(2)).resolve().parent == libs.resolve():
                found.add(libs / Path(m.group(2)).name)
    return found


def _strip(files: list[Path]) -> bool:
    """strip --strip-unneeded each ELF file in place (the dynamic symbols stay); False when strip is missing."""
    if shutil.which("strip") is None:
        log.warning("strip not found: the kit's binaries keep their symbols")
        return False
    for path in files:
        subprocess.run(["strip", "--strip-unneeded", str(path)], check=True, capture_output=True)
    return True


def _server(dst: Path, python: str) -> list[Path]:
    """tritonserver, its libraries, the python backend and one stub under dst (the wheel's layout); the ELF files."""
    root, libs = triton_root(), libs_dir()
    stub = root / "python_backend_stubs" / python / "triton_python_backend_stub"
    if not stub.is_file():
        raise KitError(f"the nvidia-pytriton wheel has no python backend stub for Python {python} ({stub})")
    backend = root / "backends" / "python"
    elves = [root / "bin" / "tritonserver", backend / "libtriton_python.so", stub]
    server = dst / "pytriton" / "tritonserver"
    copies = {elf: server / elf.relative_to(root) for elf in elves}
    utils = backend / "triton_python_backend_utils.py"
    copies[utils] = server / utils.relative_to(root)
    for lib in loaded_libraries(elves, libs):
        copies[lib] = dst / "nvidia_pytriton.libs" / lib.name
    for src, target in copies.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    return [t for s, t in copies.items() if s.suffix != ".py"]


def _perf_analyzer(dst: Path, server_libs: Path) -> Path:
    """tools/bin/perf_analyzer and tools/lib/<plain soname> links into the server's libraries (perf.LIBS)."""
    binary = dst / "bin" / "perf_analyzer"
    binary.parent.mkdir(parents=True)
    shutil.copy2(perf.install_perf_analyzer(), binary)
    (dst / "lib").mkdir()
    for name, pattern in perf.LIBS.items():
        hits = sorted(server_libs.glob(pattern))
        if not hits:
            raise KitError(f"perf_analyzer needs {name}, but the server's libraries have no {pattern}")
        (dst / "lib" / name).symlink_to(Path("..") / ".." / "server" / "nvidia_pytriton.libs" / hits[0].name)
    return binary


def _wheel(requirement: str, pins: dict[str, tuple[str, str]], python: str, platform: str) -> zipfile.ZipFile:
    """The pinned wheel of `requirement` for `python` (downloaded once into our cache, sha256-checked), opened."""
    if python not in pins:
        raise KitError(f"no pinned {requirement} wheel for Python {python} (have {', '.join(pins)})")
    name, sha = pins[python]
    return zipfile.ZipFile(
        pinned_wheel(
            requirement,
            name,
            sha,
            cache_dir() / "wheels",
            pip_args=("--platform", platform, "--python-version", python, "--implementation", "cp"),
        )
    )


def _site(dst: Path, python: str) -> list[Path]:
    """tritonclient's Python code without the HTTP client, and python-rapidjson's extension for `python`."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise KitError("tritonclient is not installed")
    src = Path(next(iter(spec.submodule_search_locations)))
    _copy_tree(src, dst / "tritonclient", keep=lambda rel: rel.parts[0] != "http")
    with _wheel(f"python-rapidjson=={RAPIDJSON_VERSION}", RAPIDJSON, python, "manylinux_2_28_x86_64") as zf:
        member = next(m for m in zf.namelist() if m.startswith("rapidjson.") and m.endswith(".so"))
        (dst / member).write_bytes(zf.read(member))
    return [dst / member]


def _stub_site(dst: Path, python: str) -> list[Path]:
    """numpy (< 2) for the stubs, without its tests, headers and build tools; its shared objects."""
    elves = []
    with _wheel(f"numpy=={NUMPY_VERSION}", NUMPY, python, "manylinux2014_x86_64") as zf:
        for member in zf.namelist():
            parts = Path(member).parts
            if parts[0].endswith(".dist-info") or NUMPY_SKIP & set(parts) or member.endswith((".pyi", ".pxd", "/")):
                continue
            target = dst / member
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(member))
            if ".so" in target.name:
                elves.append(target)
    return elves


def _sources(dst: Path) -> None:
    """Our packages (with their data files, e.g. envoy.yaml), the model_repository template and CLIP's vocabulary."""
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise KitError(f"package {name} is not importable")
        _copy_tree(Path(next(iter(spec.submodule_search_locations))), dst / "src" / name)
    _copy_tree(template_dir(), dst / "model_repository")
    _copy_tree(clip_bpe_files(), dst / "cache" / "clip_bpe")


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def assemble(out: str | os.PathLike, python: str = "3.12", level: int = 1, max_mib: float = DEFAULT_MAX_MIB) -> dict:
    """Write the kit into `out` (replacing a previous one) and return its kit.json."""
    started = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in ("run_kit.py", "kit.json", "kit.tar.xz"):
        (out / old).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gpukit-", dir=out) as tmp:
        stage = Path(tmp) / "kit"
        elves = _server(stage / "server", python)
        elves.append(_perf_analyzer(stage / "tools", stage / "server" / "nvidia_pytriton.libs"))
        elves += _site(stage / "site", python) + _stub_site(stage / "stub-site", python)
        stripped = _strip(elves)
        _sources(stage)
        parts = {p.name: _du(p) for p in sorted(stage.iterdir())}
        with tarfile.open(out / "kit.tar.xz", "w:xz", preset=level) as tar:
            for path in sorted(stage.iterdir()):
                tar.add(path, arcname=path.name)
    shutil.copy2(LAUNCHER, out / "run_kit.py")
    pytriton = importlib.metadata.version("nvidia-pytriton")
    meta = {
        "format_version": 1,
        "python": python,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "archive": {
            "file": "kit.tar.xz",
            "bytes": (out / "kit.tar.xz").stat().st_size,
            "sha256": sha256_file(out / "kit.tar.xz"),
            "xz_preset": level,
        },
        "unpacked_bytes": parts,
        "stripped": stripped,
        "versions": {
            "tritonserver": f"2.51 (nvidia-pytriton {pytriton})",
            "tritonclient": importlib.metadata.version("tritonclient"),
            "perf_analyzer": f"tritonclient {perf.WHEEL_VERSION} wheel",
            "python-rapidjson": RAPIDJSON_VERSION,
            "stub numpy": NUMPY_VERSION,
            "built_with": sys.version.split()[0],
        },
    }
    (out / "kit.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    meta["kit_bytes"] = sum((out / n).stat().st_size for n in ("run_kit.py", "kit.json", "kit.tar.xz"))
    mib = meta["kit_bytes"] / 2**20
    log.info(
        "GPU kit %s: %.1f MiB (archive %.1f MiB; unpacked %.1f MiB: %s) of the %d MiB the device tool carries, "
        "assembled in %.0f s",
        out,
        mib,
        meta["archive"]["bytes"] / 2**20,
        sum(parts.values()) / 2**20,
        ", ".join(f"{k} {v / 2**20:.1f}" for k, v in parts.items()),
        LIMIT_MIB,
        time.monotonic() - started,
    )
    if mib > max_mib:
        raise KitError(
            f"the kit takes {mib:.1f} MiB, more than the {max_mib:g} MiB allowed "
            f"({LIMIT_MIB} MiB carry limit, the checkout included)"
        )
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clip_loadtest.gpukit.assemble",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default=".artifacts/gpu-kit", help="kit folder (git-ignored)")
    parser.add_argument("--python", default="3.12", help="the device's Python (major.minor): picks the stub")
    parser.add_argument("--level", type=int, default=1, choices=range(10), help="xz preset (1: ~30 MiB quickly)")
    parser.add_argument("--max-mib", type=float, default=DEFAULT_MAX_MIB, help="fail when the kit is larger")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        meta = assemble(args.out, args.python, args.level, args.max_mib)
    except (KitError, perf.PerfError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"{args.out}: {meta['kit_bytes'] / 2**20:.1f} MiB (limit {LIMIT_MIB} MiB with the checkout); on the device: "
        f'python3 {Path(args.out) / "run_kit.py"} --device cuda --out "$OUT"'
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
