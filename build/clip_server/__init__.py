"""The local Triton server: the tritonserver binary from the nvidia-pytriton wheel (`binary`), the backend dir it
loads (`backend_dir`, with our Python-based `pytorch` runner, `pytorch_runner`), the process wrapper (`process`),
the supervisor (`supervisor`), and the `serve`, `demo` and `gateway` commands.

The names below load on first use, so that `python -m clip_server.gateway` runs with only what the gateway image
installs (Envoy and our packages without their dependencies: no numpy, no tritonclient).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "StartupCancelled": "process",
    "TritonServer": "process",
    "free_port": "process",
    "TritonServerError": "binary",
    "Supervisor": "supervisor",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """The exported names, imported from their module on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
