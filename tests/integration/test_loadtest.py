"""CI smoke test of loadtest/locustfile.py: a short headless Locust run per protocol against the real server."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

LOCUSTFILE = Path(__file__).resolve().parents[2] / "loadtest" / "locustfile.py"
ENSEMBLES = ("encode_text", "encode_image", "zero_shot")


def _stats(csv_prefix: Path) -> dict[str, dict[str, str]]:
    with open(f"{csv_prefix}_stats.csv", newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_locust_smoke(triton_server, tmp_path, protocol):
    """8 s, 4 users, every task kind: zero failures, every ensemble called, the gate passes (exit code 0)."""
    url = triton_server.http_url if protocol == "http" else triton_server.grpc_url
    prefix = tmp_path / protocol
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", f"{protocol}://{url}",
           "-u", "4", "-r", "4", "-t", "8s", "--only-summary", "--csv", str(prefix), "--html", f"{prefix}.html",
           "--mix", "text=2,image=2,zero_shot=1", "--image-sizes", "64x48,224x224,500x375", "--num-images", "6",
           "--p99-ms", "20000"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "clip loadtest gate: pass" in output, output[-4000:]
    stats = _stats(prefix)
    total = stats["Aggregated"]
    assert int(total["Request Count"]) > 0
    assert int(total["Failure Count"]) == 0, output[-4000:]
    for name in ENSEMBLES:
        assert int(stats[name]["Request Count"]) > 0, f"{name} was never called"
        assert stats[name]["Type"] == ("gRPC" if protocol == "grpc" else "HTTP")
    assert Path(f"{prefix}.html").stat().st_size > 0


@pytest.mark.timeout(60)
def test_locust_gate_fails_on_errors(tmp_path):
    """The quitting gate turns failed requests into a non-zero exit code (nothing listens on the port)."""
    from clip_server import free_port

    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host",
           f"http://127.0.0.1:{free_port()}", "-u", "1", "-r", "1", "-t", "2s", "--only-summary",
           "--mix", "text=1", "--request-timeout", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=45, cwd=tmp_path)
    assert done.returncode != 0, (done.stdout + done.stderr)[-3000:]
    assert "clip loadtest gate: FAIL" in done.stdout + done.stderr
