"""Reaching the server as people expect: URL schemes (http, https, grpc, grpcs), real TLS, fast clear failures when
no server is there, retries once one was, and the same URLs in the CLI and the locustfile. Against the real server,
sync and async, HTTP and gRPC."""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from clip_client import ServerUnavailableError
from clip_client.cli import main
from tests.integration.client_helpers import COMBOS, make_client
from tests.integration.relay import Relay, make_test_ca

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["a photo of a cat", "a red car"]
VERIFY_FAILED = re.compile(r"certificate.verify.failed", re.IGNORECASE)
IDS = [f"{p}-{m}" for p, m in COMBOS]


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def reference_embeds(triton_server) -> np.ndarray:
    """TEXTS embedded over plain gRPC, what every other way of calling must answer too."""
    c = make_client(f"grpc://{triton_server.grpc_url}", "sync")
    try:
        return c.encode_text(TEXTS)
    finally:
        c.close()


@pytest.fixture(scope="module")
def tls(triton_server, tmp_path_factory):
    """A test CA, and TLS-terminating relays in front of the server's HTTP and gRPC ports: (ca, {protocol: port})."""
    ca = make_test_ca(tmp_path_factory.mktemp("tls"))
    relays = {
        "http": Relay(_port(triton_server.http_url), ca.server_context()).start(),
        "grpc": Relay(_port(triton_server.grpc_url), ca.server_context()).start(),
    }
    yield ca, {name: r.port for name, r in relays.items()}
    for r in relays.values():
        r.close()


def _unreachable(url: str, mode: str, **options) -> tuple[str, float]:
    """(message, seconds) of the ServerUnavailableError that a first call to url raises."""
    c = make_client(url, mode, retries=6, backoff=0.5, **options)
    t0 = time.perf_counter()
    try:
        with pytest.raises(ServerUnavailableError) as info:
            c.encode_text("a cat")
        return str(info.value), time.perf_counter() - t0
    finally:
        c.close()


# ------------------------------------------------------------------------------------------- TLS


@pytest.mark.parametrize("protocol,mode", COMBOS, ids=IDS)
def test_tls_with_a_given_ca_or_the_system_roots(tls, reference_embeds, protocol, mode, monkeypatch):
    """https:// and grpcs:// really speak TLS: trusted through ca_file or the system's bundle; refused otherwise."""
    ca, ports = tls
    url = f"{protocol}s://127.0.0.1:{ports[protocol]}"
    c = make_client(url, mode, ca_file=ca.ca_file)
    try:
        np.testing.assert_allclose(c.encode_text(TEXTS), reference_embeds, atol=1e-6)
        assert c.classify(np.zeros((32, 32, 3), np.uint8), ["cat", "dog"])[0]["label"] in ("cat", "dog")
    finally:
        c.close()
    # the same certificate, untrusted (the real system bundle has no test CA): one clear error, at once
    msg, seconds = _unreachable(url, mode)
    assert seconds < 5 and msg.startswith(f"cannot reach a Triton server at {url}") and VERIFY_FAILED.search(msg), msg
    # trusted as a system CA: OpenSSL's default bundle is $SSL_CERT_FILE
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.ca_file))
    monkeypatch.delenv("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", raising=False)
    c = make_client(url, mode)
    try:
        np.testing.assert_allclose(c.encode_text(TEXTS), reference_embeds, atol=1e-6)
    finally:
        c.close()


@pytest.mark.parametrize("protocol,mode", COMBOS, ids=IDS)
def test_tls_and_plain_ports_do_not_mix(triton_server, tls, protocol, mode):
    """Plain to a TLS port and TLS to a plain port: a fast, clear failure each."""
    ca, ports = tls
    msg, seconds = _unreachable(f"{protocol}://127.0.0.1:{ports[protocol]}", mode)
    assert seconds < 5 and "Is the server running" in msg
    plain = triton_server.grpc_url if protocol == "grpc" else triton_server.http_url
    msg, seconds = _unreachable(f"{protocol}s://{plain}", mode, ca_file=ca.ca_file)
    assert seconds < 5 and "with TLS" in msg and "Does it serve TLS there" in msg


# ------------------------------------------------------------------------------------------- fast failures


@pytest.mark.parametrize("protocol,mode", COMBOS, ids=IDS)
def test_wrong_port_fails_fast_and_says_which_port_is_which(triton_server, protocol, mode):
    """HTTP to the gRPC port and gRPC to the HTTP port of a real server: no retries, a hint, within 5 s."""
    other = triton_server.http_url if protocol == "grpc" else triton_server.grpc_url
    msg, seconds = _unreachable(f"{protocol}://{other}", mode)
    assert seconds < 5, msg
    assert msg.startswith(
        f"cannot reach a Triton server at {protocol}://{other} ({'gRPC' if protocol == 'grpc' else 'HTTP'})"
    )
    assert "Is the server running" in msg


def test_a_silent_port_fails_within_5_s():
    """A port that accepts connections but never answers: every client gives up after connect_timeout (3 s)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # the kernel completes the handshakes; nobody ever reads or writes
        port = listener.getsockname()[1]
        results: dict = {}

        def one(protocol: str, mode: str) -> None:
            results[protocol, mode] = _unreachable(f"{protocol}://127.0.0.1:{port}", mode)

        threads = [threading.Thread(target=one, args=combo) for combo in COMBOS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert set(results) == set(COMBOS)
    for (protocol, mode), (msg, seconds) in results.items():
        assert seconds < 5 and "no answer within 3 s" in msg, (protocol, mode, msg)


# ------------------------------------------------------------------------------------------- retries


class _RetrySeen(logging.Handler):
    """Sets `seen` at the client's first WARNING about a retry."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen, self.messages = threading.Event(), []

    def emit(self, record):
        if "; retry " in record.getMessage():
            self.messages.append(record.getMessage())
            self.seen.set()


@pytest.mark.parametrize("protocol,mode", COMBOS, ids=IDS)
def test_after_first_contact_a_restart_is_ridden_out(triton_server, reference_embeds, protocol, mode):
    """Reached once, then the server goes away (every connection reset, the port closed) and comes back on the same
    port: the call in flight retries, logging each retry at WARNING with its reason, and then succeeds."""
    relay = Relay(_port(triton_server.grpc_url if protocol == "grpc" else triton_server.http_url)).start()
    c = make_client(f"{protocol}://127.0.0.1:{relay.port}", mode, retries=10, backoff=0.2)
    handler = _RetrySeen()
    logging.getLogger("clip_client").addHandler(handler)
    try:
        np.testing.assert_allclose(c.encode_text(TEXTS), reference_embeds, atol=1e-6)  # reached
        relay.stop()
        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(out=c.encode_text(TEXTS)))
        worker.start()
        assert handler.seen.wait(30), "no retry was logged"
        relay.start()  # the "restarted" server, same port
        worker.join(120)
        np.testing.assert_allclose(result["out"], reference_embeds, atol=1e-6)
        assert handler.messages[0].startswith("infer ") and "retry 1/10 in" in handler.messages[0]
        assert re.search(r"unavailable|refused|reset|closed|connect", handler.messages[0], re.IGNORECASE)
    finally:
        logging.getLogger("clip_client").removeHandler(handler)
        c.close()
        relay.close()


# ------------------------------------------------------------------------------------------- CLI


def test_cli_url_schemes_and_classify(triton_server, tls, tmp_path, capsys):
    """`clip-triton classify` over every scheme gives the same answer; [{label, score}] sorted, bad files alone."""
    from PIL import Image

    ca, ports = tls
    files = []
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        files.append(str(tmp_path / f"img{i}.png"))
        Image.new("RGB", (64, 48), colour).save(files[-1])
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (tmp_path / "empty.png").write_bytes(b"")
    args = [
        *files,
        str(tmp_path / "broken.jpg"),
        str(tmp_path / "empty.png"),
        "--labels",
        "red",
        "blue",
        "green",
        "--json",
    ]
    answers = []
    for url, extra in [
        (f"grpc://{triton_server.grpc_url}", []),
        (f"http://{triton_server.http_url}", []),
        (triton_server.http_url, ["--protocol", "http"]),
        (f"grpcs://127.0.0.1:{ports['grpc']}", ["--ca-file", str(ca.ca_file)]),
        (f"https://127.0.0.1:{ports['http']}", ["--ca-file", str(ca.ca_file)]),
    ]:
        rc = main(["classify", *args, "--url", url, *extra])
        out = json.loads(capsys.readouterr().out)
        assert rc == 1  # the broken and the empty file are reported, the others classified
        assert [f["path"] for f in out["failed"]] == [str(tmp_path / "broken.jpg"), str(tmp_path / "empty.png")]
        assert [r["path"] for r in out["results"]] == files
        for row in out["results"]:
            scores = [x["score"] for x in row["labels"]]
            assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-4
        answers.append(out["results"])
    for other in answers[1:]:
        for a, b in zip(answers[0], other):
            assert [x["label"] for x in a["labels"]] == [x["label"] for x in b["labels"]]
            np.testing.assert_allclose([x["score"] for x in a["labels"]], [x["score"] for x in b["labels"]], atol=1e-5)
    # the default template, and the same as the Python API
    from clip_client import DEFAULT_TEMPLATE, CLIPClient

    with CLIPClient(f"grpc://{triton_server.grpc_url}") as c:
        want = c.classify(files, ["red", "blue", "green"], templates=[DEFAULT_TEMPLATE])
    for got, expected in zip(answers[0], want):
        assert [x["label"] for x in got["labels"]] == [x["label"] for x in expected]
        np.testing.assert_allclose([x["score"] for x in got["labels"]], [x["score"] for x in expected], atol=1e-5)
    # table output, top-k, two templates
    rc = main(
        [
            "classify",
            files[0],
            "--labels",
            "red",
            "blue",
            "-k",
            "1",
            "--template",
            "a photo of a {}.",
            "--template",
            "a drawing of a {}.",
            "--url",
            f"grpc://{triton_server.grpc_url}",
        ]
    )
    line = capsys.readouterr().out.strip()
    assert rc == 0 and line.startswith(files[0] + "\t") and len(line.split("\t")) == 2


def test_cli_fails_fast_and_clearly(triton_server, capsys):
    t0 = time.perf_counter()
    rc = main(["classify", "x.png", "--labels", "a", "--url", f"http://{triton_server.grpc_url}"])
    err = capsys.readouterr().err
    assert rc == 2 and time.perf_counter() - t0 < 5
    assert err.startswith(
        f"clip-triton classify: error: cannot reach a Triton server at http://{triton_server.grpc_url}"
    )
    assert "Traceback" not in err
    rc = main(["classify", "x.png", "--labels", "a", "--url", "ftp://127.0.0.1:1"])
    assert rc == 2 and "unknown URL scheme 'ftp'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- locustfile


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scheme", ["grpcs", "https"])
def test_locust_over_tls(tls, tmp_path, scheme):
    """The locustfile takes https:// and grpcs:// hosts (and --ca-file) like the client: a short run, no failures."""
    ca, ports = tls
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(ROOT / "loadtest" / "locustfile.py"),
        "--headless",
        "--host",
        f"{scheme}://127.0.0.1:{ports[scheme[:-1]]}",
        "--ca-file",
        str(ca.ca_file),
        "-u",
        "2",
        "-r",
        "2",
        "-t",
        "3s",
        "--only-summary",
        "--mix",
        "text=1,image=1,zero_shot=0",
        "--image-sizes",
        "64x48",
        "--num-images",
        "2",
        "--min-requests",
        "4",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=tmp_path)
    output = done.stdout + done.stderr
    # the gate passes only with >= 4 requests and no failure at all
    assert done.returncode == 0 and "clip loadtest gate: pass" in output, output[-4000:]
    assert ("gRPC" if scheme == "grpcs" else "HTTP") + "     encode_text" in output, output[-4000:]
    # an unknown scheme stops the run at once with one message
    bad = subprocess.run(
        [*cmd[:7], "ftp://127.0.0.1:1", *cmd[8:]], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert bad.returncode != 0 and "unknown URL scheme 'ftp'" in bad.stdout + bad.stderr
