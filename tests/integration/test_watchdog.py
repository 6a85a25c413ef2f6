"""docker/watchdog.py (the chart's inference-check sidecar) against the real server: a dead Python stub keeps its
model "ready", the watchdog's real inferences fail, and it stops tritonserver so that Kubernetes restarts it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from clip_common.contract import PreprocessText
from clip_server import TritonServer
from tests.integration.triton_helpers import wait_until

SCRIPT = Path(__file__).resolve().parents[2] / "docker" / "watchdog.py"


def test_dead_stub_gets_the_server_stopped(triton_repository, tmp_path):
    server = TritonServer(triton_repository, log_path=tmp_path / "triton.log", exit_timeout=3)
    with server:
        env = {**os.environ, "CLIP_HEALTH_URL": f"http://{server.http_url}", "CLIP_REPOSITORY": str(triton_repository),
               "CLIP_WATCH_INTERVAL": "0.2", "CLIP_WATCH_FAILURES": "2", "CLIP_WATCH_PID": str(server.process.pid)}
        watchdog = subprocess.Popen([sys.executable, str(SCRIPT)], env=env, stderr=subprocess.PIPE, text=True)
        try:
            assert "inference check passed" in watchdog.stderr.readline()  # armed by a first success
            os.kill(server.stubs()[PreprocessText.NAME][0], signal.SIGKILL)
            assert server.model_ready(PreprocessText.NAME)  # Triton 24.10 still calls it ready
            assert wait_until(lambda: not server.running, 60), "the watchdog did not stop tritonserver"
        finally:
            watchdog.kill()
            watchdog.wait()
        assert "stopping tritonserver" in watchdog.stderr.read()
