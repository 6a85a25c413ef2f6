"""The gateway's edges found by the attack (issue 23): oversized headers get 431 at the edge and are not retried, by
Envoy or by our client; every request carries an x-request-id (the client's own kept), echoed back and written to the
JSON access log."""

from __future__ import annotations

import http.client
import json
import time

import pytest

from clip_client import CLIPClient
from clip_client.errors import CLIPClientError
from tests.integration.gateway_helpers import metric, start_gateway

BIG = "a" * 40 * 1024  # one 40 KiB header: Triton 2.51 drops the connection from 8 KiB


@pytest.fixture(scope="module")
def gateway(triton_server):
    """`clip-triton gateway --access-log` over the session's server."""
    gw = start_gateway(
        [f"{triton_server.http_url}:{triton_server.server.grpc_port}"], "--access-log", "--limits-timeout", "30"
    )
    try:
        yield gw
    finally:
        gw.stop()


def _get(gateway, path: str, **headers: str) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.http_port, timeout=30)
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp


def _requests_seen(gateway) -> float:
    return metric(gateway.metrics(), "envoy_http_downstream_rq_total", envoy_http_conn_manager_prefix="http_gateway")


def _upstream_requests(gateway) -> float:
    return metric(gateway.metrics(), "envoy_cluster_upstream_rq_total", envoy_cluster_name="triton_http")


def test_oversized_headers_get_431_at_the_edge_once(gateway):
    upstream = _upstream_requests(gateway)
    status = _get(gateway, "/v2/health/ready", **{"x-big": BIG}).status
    assert (status, _upstream_requests(gateway) - upstream) == (431, 0)


def test_our_client_does_not_retry_431(gateway):
    seen = _requests_seen(gateway)
    t0 = time.monotonic()
    client = CLIPClient(gateway.http_url, protocol="http", headers={"x-big": BIG}, timeout=30)
    with client, pytest.raises(CLIPClientError, match="431"):
        client.encode_text(["a photo"])
    # the client's first contact (server metadata: an error answer means a server is there) and the call itself, once
    assert (_requests_seen(gateway) - seen, time.monotonic() - t0 < 10) == (2, True)


def test_request_ids_are_set_kept_and_logged(gateway):
    generated = _get(gateway, "/v2/health/ready").getheader("x-request-id")
    kept = _get(gateway, "/v2/health/ready", **{"x-request-id": "req-from-the-client-42"}).getheader("x-request-id")
    deadline = time.monotonic() + 30  # Envoy writes its access log out every 10 s (its file flush interval)
    logged: set[str] = set()
    while time.monotonic() < deadline and not {generated, kept} <= logged:
        for line in list(gateway.output):
            if line.startswith("{"):
                try:
                    logged.add(json.loads(line)["request_id"])
                except (ValueError, KeyError):
                    pass
        time.sleep(0.2)
    assert (len(generated or "") >= 32, kept, {generated, kept} <= logged) == (True, "req-from-the-client-42", True)
