"""`clip-triton serve`: fails with the server's own message on a broken model; stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from clip_server import TritonServer, TritonServerError, free_port
from tests.integration.triton_helpers import read_until_ready, wait_until

CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "X" data_type: TYPE_FP32 dims: [ -1 ] }} ]
output [ {{ name: "Y" data_type: TYPE_FP32 dims: [ -1 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""

IDENTITY = """import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy())])
                for r in requests]
"""

BROKEN = """class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("broken on purpose: missing vocabulary")
"""


def _repo(root: Path, models: dict[str, str]) -> Path:
    for name, source in models.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(CONFIG.format(name=name))
        (root / name / "1" / "model.py").write_text(source)
    return root


def _serve_cmd(repo: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "clip_client.cli",
        "serve",
        "--repository",
        str(repo),
        "--http-port",
        str(free_port()),
        "--grpc-port",
        str(free_port()),
        "--metrics-port",
        str(free_port()),
        "--startup-timeout",
        "120",
    ]


def test_serve_fails_with_the_servers_message(tmp_path):
    repo = _repo(tmp_path / "repo", {"ok": IDENTITY, "broken": BROKEN})
    proc = subprocess.run(_serve_cmd(repo), capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert "broken on purpose: missing vocabulary" in proc.stderr, proc.stderr[-3000:]
    assert "Ctrl-C to stop" not in proc.stdout


def test_wait_ready_raises_with_the_model_error(tmp_path):
    server = TritonServer(_repo(tmp_path / "repo", {"broken": BROKEN}), exit_timeout=2)
    server.start()
    try:
        with pytest.raises(TritonServerError, match="broken on purpose"):
            server.wait_ready(120)
    finally:
        server.stop()


def test_serve_stops_cleanly_on_sigterm(tmp_path):
    repo = _repo(tmp_path / "repo", {"identity": IDENTITY})
    proc = subprocess.Popen(_serve_cmd(repo), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = read_until_ready(proc)
        assert any("HTTP" in line for line in lines), "".join(lines) + proc.stderr.read()
        children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert children, "tritonserver and its stub should be running"
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0

        def leftovers():
            alive = []
            for p in children:
                try:
                    if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                        alive.append(p)
                except psutil.NoSuchProcess:
                    pass
            return alive

        assert wait_until(lambda: not leftovers(), 10), leftovers()
    finally:
        if proc.poll() is None:
            proc.kill()


SLOW_START = """import time


class TritonPythonModel:
    def initialize(self, args):
        time.sleep(120)
"""


def test_sigterm_while_models_load_stops_at_once(tmp_path):
    repo = _repo(tmp_path / "repo", {"slow": SLOW_START})
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(_serve_cmd(repo), stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "triton_python_backend_stub" not in " ".join(
            " ".join(c.cmdline()) for c in psutil.Process(proc.pid).children(recursive=True)
        ):
            time.sleep(0.2)  # the slow model's stub is running its initialize()
        os.kill(proc.pid, signal.SIGTERM)
        # the load alone takes 120 s: an exit within 60 s means serve did not wait for it (no timing threshold)
        assert proc.wait(60) == 0, log.read_text()
        assert "while starting" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_second_serve_on_ports_in_use_fails_at_once_naming_the_port(tmp_path):
    """A second `serve` on the first one's ports exits non-zero within seconds, names the port, never says ready."""
    repo = _repo(tmp_path / "repo", {"identity": IDENTITY})
    cmd = _serve_cmd(repo)
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        read_until_ready(first)
        t0 = time.monotonic()
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        seconds = time.monotonic() - t0
        http_port = cmd[cmd.index("--http-port") + 1]
        assert (second.returncode, "ready" in second.stdout, f"HTTP {http_port}" in second.stderr, seconds < 15) == (
            1,
            False,
            True,
            True,
        ), (second.returncode, second.stdout, second.stderr[-2000:], seconds)
    finally:
        first.terminate()
        first.wait(60)


def test_serve_logs_json_lines_when_asked(tmp_path):
    """--log-format json: every line serve logs is one JSON object with time, level, logger and message."""
    repo = _repo(tmp_path / "repo", {"identity": IDENTITY})
    proc = subprocess.Popen(
        [*_serve_cmd(repo), "--log-format", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        read_until_ready(proc)
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    records = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records), err[-2000:]
