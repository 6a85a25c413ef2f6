"""The local Triton server: the tritonserver binary from the nvidia-pytriton wheel (`binary`), the backend dir it
loads (`backend_dir`, with our Python-based `pytorch` runner, `pytorch_runner`), the process wrapper (`process`),
the supervisor (`supervisor`), and the `serve` and `demo` commands."""

from .binary import TritonServerError
from .process import StartupCancelled, TritonServer, free_port
from .supervisor import Supervisor

__all__ = ["StartupCancelled", "Supervisor", "TritonServer", "TritonServerError", "free_port"]
