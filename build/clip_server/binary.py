"""Find the tritonserver shipped in the nvidia-pytriton wheel: binary, bundled libraries, environment."""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
from pathlib import Path

PYTHON_TAG = f"{sys.version_info.major}.{sys.version_info.minor}"
SERVER_ROOT_ENV = "CLIP_TRITON_SERVER_ROOT"
PYTHON_ENV_ENV = "CLIP_TRITON_PYTHON_ENV"


class TritonServerError(RuntimeError):
    """The server could not start, a model failed to load, or the server died."""


def _site_packages_of(package: str) -> Path:
    """Site-packages folder holding `package`, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError(f"python package {package!r} is not installed (pip install nvidia-pytriton)")
    return Path(next(iter(spec.submodule_search_locations))).resolve().parent


def server_root() -> Path:
    """Folder of `pytriton/tritonserver` + `nvidia_pytriton.libs`: $CLIP_TRITON_SERVER_ROOT, else the wheel's."""
    env = os.environ.get(SERVER_ROOT_ENV)
    return Path(env) if env else _site_packages_of("pytriton")


def triton_root() -> Path:
    """The `pytriton/tritonserver` folder (binary, backends, python stubs)."""
    root = server_root() / "pytriton" / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise TritonServerError(f"no tritonserver binary under {root}")
    return root


def tritonserver_binary() -> Path:
    """Path of the tritonserver executable."""
    return triton_root() / "bin" / "tritonserver"


def libs_dir() -> Path:
    """The server's bundled shared libraries (`nvidia_pytriton.libs`, names hashed by auditwheel)."""
    return server_root() / "nvidia_pytriton.libs"


def library_path() -> str:
    """LD_LIBRARY_PATH the server needs: the wheel's bundled libs, then Python's own lib dir (libpython)."""
    parts = [str(libs_dir()), sysconfig.get_config_var("LIBDIR") or ""]
    old = os.environ.get("LD_LIBRARY_PATH")
    if old:
        parts.append(old)
    return os.pathsep.join(p for p in parts if p)


def stub_env_bin() -> Path:
    """bin/ of the stubs' Python environment: $CLIP_TRITON_PYTHON_ENV/bin, else the running interpreter's."""
    env = os.environ.get(PYTHON_ENV_ENV)
    return Path(env) / "bin" if env else Path(sysconfig.get_path("scripts"))


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver: the stubs' venv bin/ first on PATH (stubs find packages so, not by PYTHONPATH)."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([str(stub_env_bin()), env.get("PATH", "/usr/bin:/bin")])
    env["LD_LIBRARY_PATH"] = library_path()
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Idle OpenMP threads of one encoder process must not spin on cores another process needs (measured 3-16x
    # throughput under outside CPU load, noise on a quiet machine).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env
