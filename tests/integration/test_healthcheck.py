"""docker/healthcheck.py (the compose health check: clip_server.probe, one shot) against the real server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from clip_server import free_port

SCRIPT = Path(__file__).resolve().parents[2] / "docker" / "healthcheck.py"


def _check(url: str, repository: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CLIP_HEALTH_URL": url, "CLIP_REPOSITORY": str(repository)}
    return subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)


def test_healthy_server_passes(triton_server):
    result = _check(f"http://{triton_server.http_url}", triton_server.repository)
    assert result.returncode == 0, result.stderr


def test_unreachable_server_fails(triton_server):
    result = _check(f"http://127.0.0.1:{free_port()}", triton_server.repository)
    assert result.returncode == 1 and "unhealthy" in result.stderr


def test_missing_model_fails(triton_server, tmp_path):
    (tmp_path / "not_served" / "1").mkdir(parents=True)
    (tmp_path / "not_served" / "config.pbtxt").write_text('backend: "python"\n')
    result = _check(f"http://{triton_server.http_url}", tmp_path)
    assert result.returncode == 1 and "model not_served not ready" in result.stderr, result.stderr
