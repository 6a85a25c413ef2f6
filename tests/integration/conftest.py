"""The real tritonserver (from the nvidia-pytriton wheel) serving a tiny CLIP repository, started once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from clip_server import TritonServer
from tests.integration.triton_helpers import serving


@dataclass
class ServingHandle:
    """What serving tests need: endpoints, the built repository, and the weights/checkpoint it came from."""

    server: TritonServer
    repository: Path
    weights_dir: Path
    checkpoint_dir: Path

    @property
    def http_url(self) -> str:
        return self.server.http_url  # "127.0.0.1:PORT"

    @property
    def grpc_url(self) -> str:
        return self.server.grpc_url

    @property
    def metrics_url(self) -> str:
        return self.server.metrics_url


@pytest.fixture(scope="session")
def triton_repository(tmp_path_factory, weights) -> Path:
    """A model repository built from the tiny random CLIP weights (fp32, CPU)."""
    from clip_build.repository import build_repository

    return build_repository(weights("clip"), tmp_path_factory.mktemp("model_repository"), max_queue_delay_us=2000)


@pytest.fixture(scope="session")
def triton_server(triton_repository, weights, checkpoints, tmp_path_factory):
    """A running tritonserver on free ports; stopped at the end of the session."""
    log_path = tmp_path_factory.mktemp("tritonserver") / "tritonserver.log"
    with serving(triton_repository, log_path=log_path, exit_timeout=3) as server:
        yield ServingHandle(server, Path(triton_repository), Path(weights("clip")), Path(checkpoints("clip")))
