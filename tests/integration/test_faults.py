"""Faults: a python stub killed or stopped under load, Triton aborting on SIGCONT (the supervisor restarts the server,
clip_client retries carry every request through, no wrong answer, the old server's shared memory is removed); restart
storms end supervision; SIGTERM under load drains in-flight requests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from clip_server import Supervisor, TritonServer, TritonServerError, free_port
from clip_server.process import SHM_DIR
from tests.integration.triton_helpers import (
    CLIP_WORKERS,
    GoodTraffic,
    read_until_ready,
    repository_copy,
    serving,
    wait_until,
)


def stub_pid(server: TritonServer, model: str) -> int:
    """The python backend stub serving `model` (process name triton_python_backend_stub, model path in cmdline)."""
    for pid in server.pids()[1:]:
        proc = psutil.Process(pid)
        cmd = proc.cmdline()
        if "triton_python_backend_stub" in cmd[0] and f"/{model}/" in cmd[1]:
            return pid
    raise AssertionError(f"no stub for {model}: {server.stubs()}")


@pytest.fixture(scope="module")
def supervised(triton_server, tmp_path_factory):
    """Its own server on its own copy of the repository, supervised from a thread (inference probe every second);
    shared by the fault tests of this module, each leaving it serving."""
    tmp = tmp_path_factory.mktemp("supervised")
    with serving(
        repository_copy(triton_server, tmp / "repo"), exit_timeout=2, log_path=tmp / "tritonserver.log"
    ) as server:
        sup = Supervisor(
            server,
            check_interval=0.5,
            confirm_delay=0.2,
            max_restarts=5,
            window=600,
            probe_interval=1.0,
            probe_timeout=20,
        )
        stop = threading.Event()
        thread = sup.start_thread(stop)
        try:
            yield server, sup
        finally:
            stop.set()
            thread.join(60)


def wait_restored(sup: Supervisor, before: int, timeout: float = 120) -> dict:
    """The first successful restart after the `before`-th one."""
    assert wait_until(lambda: any(r["ok"] for r in sup.restarts[before:]), timeout), sup.restarts
    return next(r for r in sup.restarts[before:] if r["ok"])


def assert_flowing(good: GoodTraffic, since: float) -> None:
    """Image and text requests are answered again after `since` (clients in a backoff sleep send again soon)."""
    assert wait_until(lambda: good.count(since, "image") >= 4 and good.count(since, "text") >= 4, 60)


def test_killed_stub_is_restored_and_no_request_fails_or_lies(supervised):
    """kill -9 of a stub under 8 clip_client callers (gRPC and HTTP, sync and async): the supervisor restarts the
    server; the callers' retries carry every request through it (models unloading answer NOT_FOUND "no available
    versions", the gRPC calls in flight CANCELLED: both retried), and no answer is wrong."""
    server, sup = supervised
    before = len(sup.restarts)
    workers = CLIP_WORKERS + (("grpc", "sync"),) * 4  # the tester's 8 gRPC callers, and HTTP, sync and async
    with GoodTraffic(server.http_url, server.grpc_url, workers) as good:
        # every caller has reached the server first (a server never reached fails at once, by design)
        assert wait_until(lambda: good.count(0.0, "image") >= 4 and good.count(0.0, "text") >= 4, 60)
        victim = stub_pid(server, "preprocess_image")
        old_prefix = server.shm_prefix
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        restart = wait_restored(sup, before)
        restored = time.monotonic() - killed_at
        assert_flowing(good, killed_at + restored)
    print(
        f"stub {victim} killed; service restored after {restored:.1f}s; restart {restart}; {len(good.results)} requests"
    )
    assert restored < 60, restored
    assert len(sup.restarts) == before + 1 and "stub" in restart["reason"]
    assert victim not in [p for pids in server.stubs().values() for p in pids]
    assert not list(SHM_DIR.glob(old_prefix + "*"))  # the regions of the stopped server are gone
    good.assert_all_good()
    assert not server.not_ready_models() and not server.dead_stubs()


def test_stopped_stub_is_restarted_and_sigcont_abort_is_a_restart(supervised):
    """SIGSTOP of a stub (alive, unresponsive: Triton answers "not healthy" and keeps it ready): the supervisor's
    inference probe restarts the server. Then a stub stopped while requests run and continued before anyone acts:
    Triton 2.51 aborts (boost lock_exception) and the supervisor restarts it. No caller sees either."""
    server, sup = supervised
    with GoodTraffic(server.http_url, server.grpc_url, CLIP_WORKERS) as good:
        before, victim, old_prefix = len(sup.restarts), stub_pid(server, "preprocess_text"), server.shm_prefix
        stopped_at = time.monotonic()
        os.kill(victim, signal.SIGSTOP)
        try:
            restart = wait_restored(sup, before)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGCONT)  # normally gone with the old server
        assert "probe" in restart["reason"] and "not healthy" in restart["reason"], restart
        assert not list(SHM_DIR.glob(old_prefix + "*"))
        assert_flowing(good, stopped_at + restart["seconds"])

        sup.probe_interval = 0  # the probe would restart first; let the stub be continued while requests wait on it
        before, victim, old_prefix = len(sup.restarts), stub_pid(server, "preprocess_image"), server.shm_prefix
        failed_before = failures(server, "preprocess_image")
        frozen_at = time.monotonic()
        os.kill(victim, signal.SIGSTOP)
        try:
            assert wait_until(lambda: failures(server, "preprocess_image") > failed_before, 30)  # "not healthy"
        finally:
            continued_at = time.monotonic()
            os.kill(victim, signal.SIGCONT)
        sup.probe_interval = 1.0
        if wait_until(lambda: len(sup.restarts) > before, 30):  # measured: the server aborts or the stub exits
            wait_restored(sup, before)
            assert not list(SHM_DIR.glob(old_prefix + "*"))
        restored_at = time.monotonic()
        assert_flowing(good, continued_at)
    print(f"restarts: {sup.restarts}; {len(good.results)} requests")
    # Between the freeze and the restart, Triton 2.51 may answer a request with the resumed stub's stale result
    # (seen in 2 of ~8 runs of this module: one wrong embedding, no error); every answer outside that window is exact.
    stale = good.assert_all_good(stale_window=(frozen_at, restored_at))
    print(f"wrong answers between the freeze and the restart (Triton 2.51, probe disabled): {stale}")
    assert not server.not_ready_models() and not server.dead_stubs()


def failures(server: TritonServer, model: str) -> int:
    """Failed requests of `model` so far (Triton's metrics endpoint)."""
    import urllib.request

    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith("nv_inference_request_failure{") and f'model="{model}"' in line
    )


class _FakeServer:
    """A server that never comes back: the supervisor must give up, not loop."""

    exit_timeout = 1
    running = False
    process = None
    starts = 0
    http_url, metrics_url, models = "127.0.0.1:9", "http://127.0.0.1:9/metrics", ["x"]  # the probe's target: unused

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


class _RecordedWaits(threading.Event):
    """A stop event whose waits return at once (never set) and are recorded: the supervisor's timing, without time."""

    def __init__(self):
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout=None):
        self.waits.append(timeout)
        return self.is_set()


def test_supervisor_gives_up_after_a_restart_storm():
    fake = _FakeServer()
    sup = Supervisor(fake, check_interval=0.001, confirm_delay=0.002, max_restarts=3, window=60, backoff=0.01)
    stop = _RecordedWaits()
    assert sup.run(stop) == 1
    assert sup.gave_up and fake.starts == 3 and len(sup.restarts) == 3
    assert not any(r["ok"] for r in sup.restarts)
    backoffs = [w for w in stop.waits if w not in (sup.check_interval, sup.confirm_delay)]
    assert backoffs == [0.01, 0.02]  # none before the first restart, then doubling; the fourth failure gives up


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
            x = pb_utils.get_input_tensor_by_name(r, "X").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", x)]))
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
        [
            sys.executable,
            "-m",
            "clip_client.cli",
            "serve",
            "--repository",
            str(repo),
            "--http-port",
            str(http_port),
            "--grpc-port",
            str(free_port()),
            "--metrics-port",
            str(free_port()),
            "--exit-timeout",
            "20",
            "--startup-timeout",
            "120",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        lines = read_until_ready(proc)
        out = "".join(lines)
        assert "Ctrl-C to stop" in out, out + proc.stderr.read()
        assert sum(line.startswith("admin key: ") for line in lines) == 1  # generated key, printed once

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
    expected = [
        f.replace("${CLIP_ADMIN_KEY:?set CLIP_ADMIN_KEY}", "KEY")
        for f in compose["x-triton-flags"]
        if "restricted" in f
    ]
    assert flags == expected
    shm = [a for a in server.command() if "shm-" in a and "prefix" not in a]  # the prefix is per start (local only)
    assert shm == [f for f in compose["x-triton-flags"] if "shm-" in f] and len(shm) == 2
    assert not any("http-max-input-size" in f for f in compose["x-triton-flags"])  # 2.51 refuses to start with it
    assert not [a for a in TritonServer(tmp_path, backend_dir=tmp_path).command() if "restricted" in a]
    with pytest.raises(TritonServerError):
        TritonServer(tmp_path, admin_key="a:b")
