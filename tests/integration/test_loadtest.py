"""CI smoke test of loadtest/locustfile.py: a short headless Locust run per protocol against the real server, and
against the real gateway as the clip-triton chart runs it by default (API keys, TLS with a self-signed certificate)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.gateway_helpers import self_signed_certificate, start_gateway

LOCUSTFILE = Path(__file__).resolve().parents[2] / "loadtest" / "locustfile.py"
ENSEMBLES = ("encode_text", "encode_image", "zero_shot")
KEY = "lt-key-0123456789abcdef0123456789"


def _stats(csv_prefix: Path) -> dict[str, dict[str, str]]:
    with open(f"{csv_prefix}_stats.csv", newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_locust_smoke(triton_server, tmp_path, protocol):
    """8 s, 4 users, every task kind: zero failures, every ensemble called, the gate passes (exit code 0)."""
    url = triton_server.http_url if protocol == "http" else triton_server.grpc_url
    prefix = tmp_path / protocol
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        f"{protocol}://{url}",
        "-u",
        "4",
        "-r",
        "4",
        "-t",
        "8s",
        "--only-summary",
        "--csv",
        str(prefix),
        "--html",
        f"{prefix}.html",
        "--mix",
        "text=2,image=2,zero_shot=1",
        "--image-sizes",
        "64x48,224x224,500x375",
        "--num-images",
        "6",
        "--p99-ms",
        "20000",
    ]
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

    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        f"http://127.0.0.1:{free_port()}",
        "-u",
        "1",
        "-r",
        "1",
        "-t",
        "2s",
        "--only-summary",
        "--mix",
        "text=1",
        "--request-timeout",
        "2",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=45, cwd=tmp_path)
    assert done.returncode != 0, (done.stdout + done.stderr)[-3000:]
    assert "clip loadtest gate: FAIL" in done.stdout + done.stderr


@pytest.fixture(scope="module")
def secure_gateway(triton_server, tmp_path_factory):
    """The gateway with an API key and TLS (a self-signed certificate for localhost, made here); its folder holds
    ca.crt and the key file in the chart's Secret layouts (the certificate is its own CA)."""
    folder = tmp_path_factory.mktemp("secure-gateway")
    cert, key = folder / "ca.crt", folder / "tls.key"
    self_signed_certificate(cert, key, "DNS:localhost")
    (folder / "api-keys").write_text(f"# comment lines and extra keys as in the chart's Secret\n{KEY}\nsecond-key\n")
    server = triton_server.server
    gw = start_gateway(
        [f"127.0.0.1:{server.http_port}:{server.grpc_port}"],
        "--api-key",
        KEY,
        "--api-key",
        "second-key",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
    )
    yield gw, folder
    gw.stop()


def _secure_run(gateway, folder: Path, protocol: str, prefix: Path, seconds: int, *extra: str, workers: int = 0):
    """Locust against the secure gateway, configured as the load-test chart's pods are: by CLIP_LT_* variables
    (with `workers`, distributed as the chart runs it: a master and that many worker processes, all with them)."""
    from clip_server import free_port

    gw, _ = gateway
    host = f"https://localhost:{gw.http_port}" if protocol == "http" else f"grpcs://localhost:{gw.grpc_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLIP_LT_", "CLIP_TRITON_API_KEYS"))}
    env |= {
        "CLIP_LT_API_KEY_FILE": str(folder / "api-keys"),
        "CLIP_LT_MIX": "text=2,image=2,zero_shot=1",
        "CLIP_LT_IMAGE_SIZES": "64x48,224x224",
        "CLIP_LT_NUM_IMAGES": "4",
        "CLIP_LT_TIMEOUT": "20",
    }
    locust = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE)]
    port = str(free_port())
    role = ["--master", "--master-bind-port", port, "--expect-workers", str(workers)] if workers else []
    procs = [
        subprocess.Popen(
            [*locust, "--worker", "--master-port", port],
            cwd=prefix.parent,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(workers)
    ]
    try:
        return subprocess.run(
            [
                *locust,
                *role,
                "--headless",
                "--host",
                host,
                "-u",
                "2",
                "-r",
                "2",
                "-t",
                f"{seconds}s",
                "--only-summary",
                "--csv",
                str(prefix),
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=prefix.parent,
            env=env,
        )
    finally:
        for proc in procs:
            try:
                proc.wait(15)  # a worker quits with its master
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("protocol, workers", [("http", 0), ("grpc", 1)])
def test_locust_through_the_secure_gateway(secure_gateway, tmp_path, protocol, workers):
    """The key from a key file and the CA from a file (gRPC: master + worker, as the chart runs them): zero failures
    over https:// / grpcs://, every ensemble called."""
    prefix = tmp_path / protocol
    done = _secure_run(
        secure_gateway,
        secure_gateway[1],
        protocol,
        prefix,
        6,
        "--ca-file",
        str(secure_gateway[1] / "ca.crt"),
        workers=workers,
    )
    output = done.stdout + done.stderr
    stats = _stats(prefix)
    called = {name for name in ENSEMBLES if int(stats.get(name, {}).get("Request Count", 0)) > 0}
    assert (done.returncode, int(stats["Aggregated"]["Failure Count"]), called) == (0, 0, set(ENSEMBLES)), output[
        -4000:
    ]


@pytest.mark.timeout(90)
def test_locust_verifies_the_gateways_certificate(secure_gateway, tmp_path):
    """Without the CA the self-signed certificate is refused: every request fails and the gate fails the run."""
    prefix = tmp_path / "untrusted"
    done = _secure_run(secure_gateway, secure_gateway[1], "grpc", prefix, 6, "--request-timeout", "5")
    total = _stats(prefix)["Aggregated"]
    assert (done.returncode, int(total["Failure Count"]) == int(total["Request Count"]) > 0) == (1, True), (
        done.stdout + done.stderr
    )[-4000:]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flag", ["--ca-file", "--api-key-file"])
def test_locust_stops_before_any_request_on_unusable_tls_or_key_files(tmp_path, flag):
    """A CA for a plain-text host, or a key file without a key: exit code 2 at startup, not failed requests."""
    from clip_server import free_port

    given = tmp_path / "given.txt"
    given.write_text("# only a comment\n")
    scheme = "http" if flag == "--ca-file" else "https"
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        f"{scheme}://127.0.0.1:{free_port()}",
        "-u",
        "1",
        "-r",
        "1",
        "-t",
        "2s",
        "--only-summary",
        flag,
        str(given),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIP_LT_")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=45, cwd=tmp_path, env=env)
    output = done.stdout + done.stderr
    assert (done.returncode, "clip loadtest gate" in output) == (2, False), output[-3000:]
