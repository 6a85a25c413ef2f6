"""clip-triton GPU kit launcher (`run_kit.py` in the kit; standard library only).

Unpacks kit.tar.xz once (under $CLIP_GPUKIT_HOME, default /tmp/clip-gpukit) and runs `python -m
clip_loadtest.gpukit.run` with every argument given here, this interpreter's packages (torch, numpy, Pillow, ...)
behind the kit's (our code, tritonclient: PYTHONPATH). The Triton python stubs ignore PYTHONPATH: they get a virtual
environment (found through PATH, $CLIP_TRITON_PYTHON_ENV) with the kit's packages, then the kit's numpy 1.26 (the
24.10 stub misreads numpy 2 arrays), then this interpreter's packages.

    python3 run_kit.py --device cuda --out "$OUT"     # the GPU machine
    python3 run_kit.py --device cpu --out results     # anywhere: the tiny CPU run CI does
"""

import json
import os
import shutil
import sys
import tarfile
import tempfile
import venv
from pathlib import Path

HOME_ENV = "CLIP_GPUKIT_HOME"


def unpack(kit: Path, meta: dict) -> Path:
    """The unpacked kit: <home>/<archive sha256[:16]>, extracted once (atomically)."""
    home = Path(os.environ.get(HOME_ENV) or Path(tempfile.gettempdir()) / "clip-gpukit")
    root = home / meta["archive"]["sha256"][:16]
    if (root / "kit.json").is_file():
        return root
    home.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=home))
    try:
        with tarfile.open(kit / meta["archive"]["file"], "r:xz") as tar:
            tar.extractall(tmp, filter="data")
        shutil.copy2(kit / "kit.json", tmp / "kit.json")  # written last: marks a complete unpack
        os.rename(tmp, root)
    except OSError:
        if not (root / "kit.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def package_dirs() -> list[str]:
    """This interpreter's package folders (site-packages / dist-packages), in sys.path order."""
    return [p for p in sys.path if p and os.path.isdir(p) and os.path.basename(p) in ("site-packages", "dist-packages")]


def make_stub_env(root: Path) -> Path:
    """<root>/stub-env: src/, site/ and stub-site/ (numpy 1.26) first, then this interpreter's package folders."""
    env = root / "stub-env"
    venv.EnvBuilder(with_pip=False, symlinks=True, clear=True).create(env)
    tag = f"python{sys.version_info.major}.{sys.version_info.minor}"
    lines = [str(root / d) for d in ("src", "site", "stub-site")]
    lines += [f"import site; site.addsitedir({d!r})" for d in package_dirs()]
    (env / "lib" / tag / "site-packages" / "clip_gpukit.pth").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return env


def main() -> int:
    kit = Path(__file__).resolve().parent
    meta = json.loads((kit / "kit.json").read_text(encoding="utf-8"))
    have = f"{sys.version_info.major}.{sys.version_info.minor}"
    if have != meta["python"]:
        print(
            f"error: this kit carries the Triton python stub for Python {meta['python']}, but {sys.executable} is "
            f"Python {have}; assemble one with `python -m clip_loadtest.gpukit.assemble --python {have}`",
            file=sys.stderr,
        )
        return 2
    root = unpack(kit, meta)
    path = [str(root / "src"), str(root / "site"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(path),
        CLIP_TRITON_PYTHON_ENV=str(make_stub_env(root)),
        CLIP_TRITON_SERVER_ROOT=str(root / "server"),
        CLIP_TRITON_CACHE=str(root / "cache"),
        CLIP_TRITON_TEMPLATE=str(root / "model_repository"),
        CLIP_GPUKIT_ROOT=str(root),
    )
    os.execve(sys.executable, [sys.executable, "-m", "clip_loadtest.gpukit.run", *sys.argv[1:]], env)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
