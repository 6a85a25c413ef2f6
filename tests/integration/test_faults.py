"""Faults: a python stub killed under load (supervisor restarts the server, client retries carry every request
through, no wrong answer); restart storms end supervision; SIGTERM under load drains in-flight requests."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from tests.integration.triton_helpers import read_until_ready, wait_until

from clip_server import Supervisor, TritonServer, TritonServerError, free_port


def _png(seed: int, h: int = 48, w: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


IMAGES = [_png(i) for i in range(4)]
TEXTS = ["a photo of a cat", "a red car", "two dogs", "an empty street"]


def stub_pid(server: TritonServer, model: str) -> int:
    """The python backend stub serving `model` (process name triton_python_backend_stub, model path in cmdline)."""
    for pid in server.pids()[1:]:
        proc = psutil.Process(pid)
        cmd = proc.cmdline()
        if "triton_python_backend_stub" in cmd[0] and f"/{model}/" in cmd[1]:
            return pid
    raise AssertionError(f"no stub for {model}: {server.stubs()}")


@pytest.fixture()
def supervised(triton_server, tmp_path):
    """Its own server on its own copy of the repository, supervised from a thread."""
    repo = tmp_path / "repo"
    shutil.copytree(triton_server.repository, repo)
    server = TritonServer(repo, exit_timeout=2, log_path=tmp_path / "tritonserver.log")
    server.start()
    server.wait_ready(180)
    sup = Supervisor(server, check_interval=0.5, confirm_delay=0.2, max_restarts=3, window=120)
    stop = threading.Event()
    thread = sup.start_thread(stop)
    try:
        yield server, sup
    finally:
        stop.set()
        thread.join(60)
        server.stop()


def test_killed_stub_is_restored_and_no_request_fails_or_lies(supervised):
    from clip_client import CLIPClient

    server, sup = supervised
    with CLIPClient(server.http_url, protocol="http") as c:
        ref_images = c.encode_image(IMAGES, normalize=False)  # each alone below would give the same (tested elsewhere)
        ref_texts = c.encode_text(TEXTS, normalize=False)

    results: list[tuple[str, int, object, float]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def worker(protocol: str, kind: str, seed: int) -> None:
        url = server.http_url if protocol == "http" else server.grpc_url
        with CLIPClient(url, protocol=protocol, retries=15, backoff=0.3, timeout=60) as c:
            k = seed
            while not stop.is_set():
                k += 1
                try:
                    if kind == "image":
                        out = c.encode_image([IMAGES[k % 4]], normalize=False)[0]
                    else:
                        out = c.encode_text([TEXTS[k % 4]], normalize=False)[0]
                except Exception as exc:  # noqa: BLE001 - asserted below
                    out = exc
                with lock:
                    results.append((kind, k % 4, out, time.monotonic()))

    threads = [threading.Thread(target=worker, args=a) for a in
               [("http", "image", 0), ("http", "image", 1), ("grpc", "image", 2), ("http", "text", 3), ("grpc", "text", 0)]]
    for t in threads:
        t.start()
    try:
        assert wait_until(lambda: len(results) >= 10, 60), "traffic never started"
        victim = stub_pid(server, "preprocess_image")
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        deadline = killed_at + 60
        while not sup.restarts and time.monotonic() < deadline:
            time.sleep(0.2)
        while not any(r["ok"] for r in sup.restarts) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sup.restarts and sup.restarts[-1]["ok"], sup.restarts
        restored = time.monotonic() - killed_at
        until = time.monotonic() + 25  # workers in a retry backoff sleep up to 10 s before they send again
        while time.monotonic() < until:
            with lock:
                if sum(r[0] == "image" and r[3] > killed_at + restored for r in results) >= 6:
                    break
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    print(f"stub {victim} killed; service restored after {restored:.1f}s; restarts {sup.restarts}; "
          f"{len(results)} requests")
    assert restored < 30, restored
    assert len(sup.restarts) == 1 and "stub" in sup.restarts[0]["reason"]
    assert victim not in [p for pids in server.stubs().values() for p in pids]
    errors = [r for r in results if isinstance(r[2], Exception)]
    assert not errors, errors[:3]
    for kind, k, out, _t in results:
        ref = (ref_images if kind == "image" else ref_texts)[k]
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-4)
    after = [r for r in results if r[3] > killed_at + restored and r[0] == "image"]
    assert len(after) >= 6, "image requests must flow again after the restart"
    assert not server.not_ready_models() and not server.dead_stubs()


class _FakeServer:
    """A server that never comes back: the supervisor must give up, not loop."""

    exit_timeout = 1
    running = False
    process = None
    starts = 0

    def log_text(self):
        return "E0101 00:00:00.000000 1 model.cc:1] broken for good"

    def stop(self, timeout=None):
        return 1

    def start(self):
        self.starts += 1

    def wait_ready(self, timeout=None):
        raise TritonServerError("models not ready")

    def dead_stubs(self):
        return []

    def not_ready_models(self):
        return ["x"]


def test_supervisor_gives_up_after_a_restart_storm():
    fake = _FakeServer()
    sup = Supervisor(fake, check_interval=0.01, confirm_delay=0.01, max_restarts=3, window=60, backoff=0.01)
    started = time.monotonic()
    assert sup.run(threading.Event()) == 1
    assert sup.gave_up and fake.starts == 3 and len(sup.restarts) == 3
    assert not any(r["ok"] for r in sup.restarts)
    assert time.monotonic() - started < 5  # backoff 0.01, 0.02: bounded


# ------------------------------------------------------------------------------------------------ SIGTERM drain
SLOW = """import os
import time
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.marks = os.path.join(args["model_repository"], "started")

    def execute(self, requests):
        out = []
        for r in requests:
            open(f"{self.marks}-{time.monotonic_ns()}", "w").close()  # the test waits for these, not a sleep
            time.sleep(2.0)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy())]))
        return out
"""

SLOW_CONFIG = """name: "slow"
backend: "python"
max_batch_size: 0
input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 6 } ]
"""


def test_sigterm_under_load_drains_in_flight_requests(tmp_path):
    import tritonclient.http as httpclient

    repo = tmp_path / "repo"
    (repo / "slow" / "1").mkdir(parents=True)
    (repo / "slow" / "config.pbtxt").write_text(SLOW_CONFIG)
    (repo / "slow" / "1" / "model.py").write_text(SLOW)
    http_port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "CLIP_TRITON_ADMIN_KEY"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "clip_client.cli", "serve", "--repository", str(repo), "--http-port", str(http_port),
         "--grpc-port", str(free_port()), "--metrics-port", str(free_port()), "--exit-timeout", "20",
         "--startup-timeout", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = read_until_ready(proc)
        out = "".join(lines)
        assert "Ctrl-C to stop" in out, out + proc.stderr.read()
        assert sum(l.startswith("admin key: ") for l in lines) == 1  # generated key, printed once

        results: dict[int, object] = {}

        def one(i: int) -> None:
            c = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}", network_timeout=60)
            x = np.full((3,), i, np.float32)
            t = httpclient.InferInput("X", [3], "FP32")
            t.set_data_from_numpy(x)
            try:
                results[i] = c.infer("slow", [t]).as_numpy("Y")
            except Exception as exc:  # noqa: BLE001 - asserted below
                results[i] = exc
            finally:
                c.close()

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]  # 6 instances x 2 s
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(list((repo / "slow").glob("started-*"))) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)  # every request is executing: all six are in flight when SIGTERM arrives
        assert len(list((repo / "slow").glob("started-*"))) == 6
        os.kill(proc.pid, signal.SIGTERM)
        sent = time.monotonic()
        for t in threads:
            t.join(60)
        code = proc.wait(60)
        for i in range(6):
            assert isinstance(results[i], np.ndarray), (i, results[i])
            assert (results[i] == i).all()
        assert code == 0, proc.stderr.read()[-3000:]
        print(f"6 in-flight requests drained; serve exited 0 {time.monotonic() - sent:.1f}s after SIGTERM")
    finally:
        if proc.poll() is None:
            proc.kill()


# ------------------------------------------------------------------------------------------------ secure defaults
def test_admin_key_resolution_and_flags_match_compose(tmp_path, monkeypatch):
    import yaml

    from clip_server.serve import resolve_admin_key

    monkeypatch.delenv("CLIP_TRITON_ADMIN_KEY", raising=False)
    assert resolve_admin_key("given", True) == ("given", False)
    assert resolve_admin_key("given", False) == (None, False)  # --no-restrict
    key, generated = resolve_admin_key(None, True)
    assert generated and len(key) >= 24 and resolve_admin_key(None, True)[0] != key
    monkeypatch.setenv("CLIP_TRITON_ADMIN_KEY", "from-env")
    assert resolve_admin_key(None, True) == ("from-env", False)

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text('name: "m"')
    server = TritonServer(tmp_path, admin_key="KEY", backend_dir=tmp_path)
    flags = [a for a in server.command() if "restricted" in a]
    compose = yaml.safe_load((Path(__file__).resolve().parents[2] / "docker-compose.yml").read_text())
    expected = [f.replace("${CLIP_ADMIN_KEY:?set CLIP_ADMIN_KEY}", "KEY") for f in compose["x-triton-flags"]
                if "restricted" in f]
    assert flags == expected
    shm = [a for a in server.command() if "shm-" in a and "prefix" not in a]  # the prefix is per start (local only)
    assert shm == [f for f in compose["x-triton-flags"] if "shm-" in f] and len(shm) == 2
    assert not any("http-max-input-size" in f for f in compose["x-triton-flags"])  # 2.51 refuses to start with it
    assert not [a for a in TritonServer(tmp_path, backend_dir=tmp_path).command() if "restricted" in a]
    with pytest.raises(TritonServerError):
        TritonServer(tmp_path, admin_key="a:b")
