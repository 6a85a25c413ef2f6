"""File helpers every server-side package shares: sha256 of a file, the project checkout, our cache folder, and
pinned wheels fetched with pip and verified by sha256 on every use."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)


class PinnedWheelError(RuntimeError):
    """A pinned wheel could not be downloaded, or the file on disk is not the pinned one."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def project_root() -> Path | None:
    """The source checkout holding this package (pyproject.toml + model_repository/), or None for an installed copy."""
    root = Path(__file__).resolve().parents[2]  # build/clip_build/files.py -> the checkout
    return root if (root / "pyproject.toml").is_file() and (root / "model_repository").is_dir() else None


def cache_dir() -> Path:
    """Our cache root: $CLIP_TRITON_CACHE, else $XDG_CACHE_HOME/clip-triton (~/.cache/clip-triton)."""
    env = os.environ.get("CLIP_TRITON_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clip-triton"


def pinned_wheel(
    requirement: str, filename: str, sha256: str, dest: str | os.PathLike, pip_args: Sequence[str] = ()
) -> Path:
    """`dest/filename`, downloaded (no deps, binary only, pip --require-hashes) when absent; sha256 checked every use.

    requirement: e.g. "open_clip_torch==3.3.0";
    pip_args: e.g. ("--platform", "manylinux1_x86_64", "--python-version", "3").
    """
    dest = Path(dest)
    path = dest / filename
    if not path.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s (no deps) into %s", requirement, dest)
        with tempfile.TemporaryDirectory(dir=dest) as tmp:  # an empty folder: only pip's download lands there
            req = Path(tmp) / "requirements.txt"
            req.write_text(f"{requirement} --hash=sha256:{sha256}\n", encoding="utf-8")
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--only-binary",
                ":all:",
                "--require-hashes",
                "-r",
                str(req),
                "-d",
                str(Path(tmp) / "dl"),
                *pip_args,
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / "dl" / filename
            if done.returncode != 0 or not got.is_file():
                raise PinnedWheelError(f"pip could not download {filename}: {done.stderr.strip()[-2000:]}")
            shutil.move(str(got), str(path))
    digest = sha256_file(path)
    if digest != sha256:
        raise PinnedWheelError(
            f"{path}: sha256 {digest} is not the pinned {sha256} of {requirement}; delete the file to download it again"
        )
    return path
