"""docker/watchdog.py (the chart's inference-check sidecar, the one check of clip_server.probe) against the real
server: broken servers are stopped so that Kubernetes restarts them, busy ones never."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from clip_common.contract import EncodeImage, PreprocessText
from clip_loadtest.hardening import heavy_request
from clip_server import TritonServer
from tests.integration.triton_helpers import repository_copy, serving, wait_until

SCRIPT = Path(__file__).resolve().parents[2] / "docker" / "watchdog.py"


def watchdog(server: TritonServer, repository: Path, **env: str) -> subprocess.Popen:
    """The sidecar watching `server`, checking every 0.2 s, two broken checks to act; its stderr piped."""
    env = {
        **os.environ,
        "CLIP_HEALTH_URL": f"http://{server.http_url}",
        "CLIP_METRICS_URL": server.metrics_url,
        "CLIP_REPOSITORY": str(repository),
        "CLIP_WATCH_INTERVAL": "0.2",
        "CLIP_WATCH_FAILURES": "2",
        "CLIP_WATCH_PID": str(server.process.pid),
        **env,
    }
    return subprocess.Popen([sys.executable, str(SCRIPT)], env=env, stderr=subprocess.PIPE, text=True)


def test_dead_stub_gets_the_server_stopped(triton_repository, tmp_path):
    server = TritonServer(triton_repository, log_path=tmp_path / "triton.log", exit_timeout=3)
    with server:
        dog = watchdog(server, triton_repository)
        try:
            assert "inference check passed" in dog.stderr.readline()  # armed by a first success
            os.kill(server.stubs()[PreprocessText.NAME][0], signal.SIGKILL)
            assert server.model_ready(PreprocessText.NAME)  # Triton 2.51 still calls it ready
            assert wait_until(lambda: not server.running, 60), "the watchdog did not stop tritonserver"
        finally:
            dog.kill()
            dog.wait()
        assert "stopping tritonserver" in dog.stderr.read()


def test_frozen_stub_gets_the_server_stopped_within_a_bound(triton_repository, tmp_path):
    """A stub alive but stopped (SIGSTOP): its model stays ready, nothing it gets executes; stopped within 30 s."""
    server = TritonServer(triton_repository, log_path=tmp_path / "triton.log", exit_timeout=1)
    with server:
        dog = watchdog(server, triton_repository, CLIP_HEALTH_TIMEOUT="3", CLIP_HEALTH_STALL="6")
        stub = server.stubs()[PreprocessText.NAME][0]
        try:
            assert "inference check passed" in dog.stderr.readline()
            os.kill(stub, signal.SIGSTOP)
            t0 = time.monotonic()
            assert wait_until(lambda: not server.running, 30), "the watchdog did not stop tritonserver"
            print(f"frozen stub: tritonserver stopped after {time.monotonic() - t0:.1f}s")
        finally:
            dog.kill()
            dog.wait()
            try:
                os.kill(stub, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert "stopping tritonserver" in dog.stderr.read()


def test_overloaded_server_is_busy_and_never_stopped(triton_server, tmp_path):
    """48 callers of 2000 x 1500 images against a queue of 2: the check's own inferences are refused (503) or late,
    and the watchdog (acting after two broken checks 0.2 s apart) reports busy and leaves tritonserver alone."""
    repo = repository_copy(triton_server, tmp_path / "repo", max_queue_size=2, queue_timeout_us=1_000_000)
    heavy = heavy_request(n_images=1)
    refused: list[int] = []
    stop = threading.Event()

    def caller(url: str) -> None:
        client = httpclient.InferenceServerClient(url, network_timeout=60)
        tensor = httpclient.InferInput(EncodeImage.IMAGE, list(heavy.shape), "BYTES")
        tensor.set_data_from_numpy(heavy)
        deadline = time.monotonic() + 25  # bounded
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                client.infer(EncodeImage.NAME, [tensor])
            except InferenceServerException:
                refused.append(1)
                time.sleep(0.05)  # a refused caller comes back soon (bounded CPU on a shared machine)
        client.close()

    with serving(repo, exit_timeout=1) as server:
        dog = watchdog(server, repo, CLIP_HEALTH_TIMEOUT="5", CLIP_HEALTH_STALL="20")
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(dog.stderr), daemon=True)
        reader.start()
        threads = [threading.Thread(target=caller, args=(server.http_url,)) for _ in range(48)]
        try:
            assert wait_until(lambda: any("inference check passed" in line for line in lines), 30), lines
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        finally:
            stop.set()
            alive = server.running
            dog.kill()
            dog.wait()
        busy = [line for line in lines if line.startswith("busy")]
        print(f"overload: {len(refused)} callers' requests refused, {len(busy)} busy checks; e.g. {busy[:1]}")
        assert alive and busy and not any("stopping" in line for line in lines), lines[-5:]
