"""Assemble the backend directory tritonserver loads: the wheel's python backend + our stub copy + our `pytorch` runner.

Built once per content under a cache folder we own; site-packages is never modified.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from clip_build.files import cache_dir

from .binary import PYTHON_TAG, TritonServerError, triton_root

# Our Python-based runner for configs that say `backend: "pytorch"` (libtorch naming rules).
RUNNER_SOURCE = Path(__file__).resolve().parent / "pytorch_runner.py"


def _backend_sources() -> dict[str, Path]:
    """Relative path in the backend dir -> source file."""
    root = triton_root()
    python_dir = root / "backends" / "python"
    stub = root / "python_backend_stubs" / PYTHON_TAG / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonServerError(f"the wheel has no python backend stub for Python {PYTHON_TAG} ({stub})")
    files = {f"python/{p.name}": p for p in python_dir.iterdir() if p.is_file()}
    files["python/triton_python_backend_stub"] = stub
    files["pytorch/model.py"] = RUNNER_SOURCE
    return files


def assemble_backend_dir(cache: Path | None = None) -> Path:
    """Build (once per content) `<cache>/backends-<hash>/{python,pytorch}`; never touches site-packages."""
    sources = _backend_sources()
    digest = hashlib.sha256()
    for rel, src in sorted(sources.items()):
        st = src.stat()
        digest.update(f"{rel}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    digest.update(RUNNER_SOURCE.read_bytes())
    cache = Path(cache) if cache else cache_dir()
    target = cache / f"backends-{digest.hexdigest()[:16]}"
    if (target / "pytorch" / "model.py").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".backends-", dir=cache))
    try:
        for rel, src in sources.items():
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        try:
            os.rename(tmp, target)  # atomic; a concurrent builder may have won the race
        except OSError:
            if not (target / "pytorch" / "model.py").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
