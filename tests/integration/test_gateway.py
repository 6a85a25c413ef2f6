"""`clip-triton gateway`: a real Envoy in front of two real tritonservers serving one repository.

Public calls through the gateway equal direct calls; internal models and admin APIs are refused at the edge (HTTP and
gRPC, crafted protobuf included); an over-cap body gets 413 and never reaches Triton; one gRPC connection's calls are
spread over both upstreams; slow, half-sent and idle connections are closed; the per-client rate limit; killing an
upstream causes no client-visible error (last test: it leaves one upstream dead).
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from clip_client import CLIPClient
from clip_common.contract import (
    ENCODERS,
    INTERNAL_MODELS,
    PUBLIC_MODELS,
    EncodeImage,
    EncodeText,
    PreprocessText,
    ZeroShot,
)
from clip_loadtest.soak import RssSampler
from clip_server import TritonServer
from clip_server.gateway import GRPC_SERVICE, MAX_MESSAGE_FIELDS, body_cap, repository_limits
from tests.integration.gateway_helpers import metric, metric_names, promql_metric_names, scrape, start_gateway
from tests.integration.triton_helpers import infer, wait_until

PROTOCOLS = ("http", "grpc")
# Small item limits, so that a body just over the cap is cheap to send.
LIMITS = {"max_items_per_request": 4, "max_text_bytes": 1024, "max_image_bytes": 64 * 1024}
TIMEOUTS = {"--headers-timeout": "1.5", "--request-timeout": "2.5", "--idle-timeout": "2"}
# Summary quantiles: what the dashboard's per-model latency panels read (docs/deploy.md).
SERVER_FLAGS = ["--metrics-config=summary_latencies=true"]
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "clip-triton" / "dashboards" / "clip-triton.json"
# Triton's GPU metrics (DCGM; docs/user_guide/metrics.md, "GPU Metrics"): exported only where a GPU is.
GPU_ONLY = {"nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes", "nv_gpu_power_usage"}


def _npy(h: int, w: int, seed: int) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))
    return buf.getvalue()


TEXTS = np.array([[b"a photo of a cat"], [b"a diagram"], ["\u00e4\u00f6\u00fc \U0001f431".encode()]], dtype=object)
IMAGES = np.array([[_npy(40, 30, 0)], [_npy(64, 64, 1)]], dtype=object)


@pytest.fixture(scope="module")
def gateway_repository(tmp_path_factory, weights):
    """One repository (tiny CLIP, small item limits) that both upstreams serve."""
    from clip_build.repository import build_repository

    return build_repository(
        weights("clip"), tmp_path_factory.mktemp("gateway_repository"), max_queue_delay_us=2000, limits=LIMITS
    )


@pytest.fixture(scope="module")
def upstreams(gateway_repository, tmp_path_factory):
    """Two tritonservers on the same repository, started together."""
    logs = tmp_path_factory.mktemp("gateway_upstreams")
    servers = [
        TritonServer(gateway_repository, log_path=logs / f"triton{i}.log", exit_timeout=3, extra_args=SERVER_FLAGS)
        for i in range(2)
    ]
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready(180)
        yield servers
    finally:
        for server in servers:
            server.stop()


def _healthy(gateway, count: int) -> bool:
    text = gateway.metrics()
    return all(
        metric(text, "envoy_cluster_membership_healthy", envoy_cluster_name=c) == count
        for c in ("triton_http", "triton_grpc")
    )


@pytest.fixture(scope="module")
def gateway(upstreams, gateway_repository):
    """`clip-triton gateway` over both upstreams, short client timeouts; it learns the limits from clip_info."""
    gw = start_gateway(
        [f"127.0.0.1:{s.http_port}:{s.grpc_port}" for s in upstreams],
        "--health-interval",
        "0.5",
        *[x for kv in TIMEOUTS.items() for x in kv],
    )
    try:
        assert wait_until(lambda: _healthy(gw, 2), 30), "".join(gw.output)
        yield gw
    finally:
        code = gw.stop()
    assert code == 0, "".join(gw.output)  # SIGTERM ends `clip-triton gateway` cleanly


def _client(url: str, protocol: str):
    if protocol == "http":
        return httpclient.InferenceServerClient(url, network_timeout=60)
    return grpcclient.InferenceServerClient(url)


def _request_counts(servers) -> list[float]:
    """Requests each server has seen (success + failure, every model)."""
    return [
        metric(scrape(s.metrics_url), "nv_inference_request_success")
        + metric(scrape(s.metrics_url), "nv_inference_request_failure")
        for s in servers
    ]


def _settled_counts(servers, at_least: float, seconds: float = 10.0) -> list[float]:
    """Request counts once the calls just answered are counted (Triton counts a request just after answering it):
    at least `at_least` in all, and unchanged over two scrapes."""
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        counts = _request_counts(servers)
        if counts == last and sum(counts) >= at_least:
            return counts
        last = counts
        time.sleep(0.2)
    raise AssertionError(f"request counts did not settle at >= {at_least}: {last}")


# ------------------------------------------------------------------------------------------------ public calls
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_public_calls_equal_direct_calls(gateway, upstreams, protocol):
    via = _client(gateway.http_url if protocol == "http" else gateway.grpc_url, protocol)
    direct = _client(upstreams[0].http_url if protocol == "http" else upstreams[0].grpc_url, protocol)
    calls = [
        (EncodeText.NAME, {EncodeText.TEXT: TEXTS}, [EncodeText.TEXT_EMBEDS]),
        (EncodeImage.NAME, {EncodeImage.IMAGE: IMAGES}, [EncodeImage.IMAGE_EMBEDS]),
        (ZeroShot.NAME, {ZeroShot.TEXT: TEXTS, ZeroShot.IMAGE: IMAGES}, list(ZeroShot.OUTPUTS)),
    ]
    for model, inputs, outputs in calls:
        got, want = infer(via, protocol, model, inputs, outputs), infer(direct, protocol, model, inputs, outputs)
        for name in outputs:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=f"{model}.{name}")
    assert via.is_server_live() and via.is_server_ready()
    for model in PUBLIC_MODELS:
        assert via.is_model_ready(model)
        meta = via.get_model_metadata(model)
        assert (meta["name"] if protocol == "http" else meta.name) == model


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_clip_client_through_the_gateway(gateway, upstreams, protocol):
    url = gateway.http_url if protocol == "http" else gateway.grpc_url
    with CLIPClient(url, protocol=protocol) as via, CLIPClient(upstreams[1].grpc_url) as direct:
        assert via.get_model_info().max_text_items == LIMITS["max_items_per_request"]  # from clip_info
        texts = ["a red square", "a blue square", "x", "y", "z"]  # more than one request's limit: split in two
        np.testing.assert_allclose(via.encode_text(texts), direct.encode_text(texts), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ refusals
def _http(gateway, method: str, path: str, body: bytes | None = None, **headers: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.http_port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **headers})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


FORBIDDEN = 403  # a /v2 path the edge does not serve: the gateway's own "forbidden at the gateway" answer
NOT_FOUND = 404  # anything outside /v2: the gateway's own "not found"


def _refused_paths() -> list[tuple[str, str, int]]:
    """(method, path, the status the edge itself answers)."""
    paths = []
    for model in INTERNAL_MODELS:
        for name in (model, f"siglip__{model}"):  # a further model's internal models (prefix N__) too
            paths += [
                ("POST", f"/v2/models/{name}/infer", FORBIDDEN),
                ("GET", f"/v2/models/{name}", FORBIDDEN),
                ("GET", f"/v2/models/{name}/ready", FORBIDDEN),
                ("POST", f"/v2/models/{name}/versions/1/infer", FORBIDDEN),
            ]
    public = EncodeText.NAME
    v2 = [
        ("GET", f"/v2/models/{public}/config"),
        ("GET", f"/v2/models/{public}/stats"),
        ("GET", "/v2/models/stats"),
        ("POST", "/v2/repository/index"),
        ("POST", f"/v2/repository/models/{public}/load"),
        ("POST", f"/v2/repository/models/{public}/unload"),
        ("GET", "/v2/systemsharedmemory/status"),
        ("POST", "/v2/systemsharedmemory/region/x/register"),
        ("GET", "/v2/cudasharedmemory/status"),
        ("GET", "/v2/trace/setting"),
        ("GET", f"/v2/models/{public}/trace/setting"),
        ("GET", "/v2/logging"),
        ("POST", "/v2/logging"),
        ("POST", f"/v2/models/{public}/generate"),
        ("GET", f"/v2/models/{public}/../{INTERNAL_MODELS[0]}/ready"),  # normalised before routing
        ("GET", f"/v2/models/{public.upper()}/ready"),
        ("GET", f"/v2/models/Siglip__{public}/ready"),
        ("GET", f"/v2/models/_x__{public}/ready"),  # not a valid prefix
    ]
    return paths + [(m, p, FORBIDDEN) for m, p in v2] + [("GET", "/metrics", NOT_FOUND), ("GET", "/", NOT_FOUND)]


EDGE_BODIES = {
    FORBIDDEN: {
        "error": f"forbidden at the gateway: only the models {', '.join(PUBLIC_MODELS)} "
        "(optionally N__-prefixed) and server health are served"
    },
    NOT_FOUND: {"error": "not found"},
}


def test_internal_models_and_admin_apis_refused_over_http(gateway, upstreams):
    before = _settled_counts(upstreams, 0)
    answers = [(m, p, *_http(gateway, m, p, b"{}" if m == "POST" else None)) for m, p, _ in _refused_paths()]
    # each one answered by the edge itself (its exact status and body), none reached Triton
    assert [(m, p, status, json.loads(body)) for m, p, status, body in answers] == [
        (m, p, status, EDGE_BODIES[status]) for m, p, status in _refused_paths()
    ]
    # an escaped slash never becomes a path separator behind the edge: Envoy rejects the request
    escaped = f"/v2/models/{EncodeText.NAME}%2F..%2F{INTERNAL_MODELS[0]}/ready"
    assert _http(gateway, "GET", escaped)[0] == 400
    assert _request_counts(upstreams) == before


def _grpc_refused(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def test_internal_models_and_admin_apis_refused_over_grpc(gateway, upstreams):
    client = grpcclient.InferenceServerClient(gateway.grpc_url)
    before = _settled_counts(upstreams, 0)
    texts = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
    texts.set_data_from_numpy(TEXTS[:1])
    for model in INTERNAL_MODELS:
        for call in (
            lambda model=model: client.infer(model, [texts]),
            lambda model=model: client.get_model_metadata(model),
            lambda model=model: client.is_model_ready(model),
        ):
            assert _grpc_refused(call).status() == "StatusCode.PERMISSION_DENIED"
    for call in (
        client.get_model_repository_index,
        lambda: client.get_model_config(EncodeText.NAME),
        client.get_inference_statistics,
        client.get_system_shared_memory_status,
        client.get_cuda_shared_memory_status,
        client.get_trace_settings,
        client.get_log_settings,
        lambda: client.load_model(EncodeText.NAME),
        lambda: client.unload_model(EncodeText.NAME),
    ):
        assert _grpc_refused(call).status() == "StatusCode.PERMISSION_DENIED"
    assert _request_counts(upstreams) == before


def _raw_infer(gateway, body: bytes) -> tuple[str, str]:
    with grpc.insecure_channel(gateway.grpc_url) as channel:
        call = channel.unary_unary(
            f"/{GRPC_SERVICE}/ModelInfer", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        try:
            call(body, timeout=30)
            return "OK", ""
        except grpc.RpcError as exc:
            return str(exc.code()), exc.details()


def test_crafted_grpc_messages_cannot_reach_internal_models(gateway, upstreams):
    request = service_pb2.ModelInferRequest(model_name=EncodeText.NAME)
    tensor = request.inputs.add(name=EncodeText.TEXT, datatype="BYTES")
    tensor.shape.extend([1, 1])
    request.raw_input_contents.append(len(b"a cat").to_bytes(4, "little") + b"a cat")
    good = request.SerializeToString()
    counted = _request_counts(upstreams)
    assert _raw_infer(gateway, good)[0] == "OK"
    before = _settled_counts(upstreams, sum(counted) + 1)
    for internal in INTERNAL_MODELS:
        # protobuf: the last occurrence of a singular field wins, so Triton would run the internal model
        sneaky = good + service_pb2.ModelInferRequest(model_name=internal).SerializeToString()
        assert service_pb2.ModelInferRequest.FromString(sneaky).model_name == internal
        assert _raw_infer(gateway, sneaky)[0] == "StatusCode.PERMISSION_DENIED"
        # the name after other fields (field order is free)
        late = (
            service_pb2.ModelInferRequest(id="x", model_version="1").SerializeToString()
            + service_pb2.ModelInferRequest(model_name=internal).SerializeToString()
        )
        assert _raw_infer(gateway, late)[0] == "StatusCode.PERMISSION_DENIED"
    assert _request_counts(upstreams) == before
    # a 5-byte tag whose bits above 32 Triton's C++ parser drops: field 1 there, last, so it wins
    text = service_pb2.ModelInferRequest()
    tensor = text.inputs.add(name=PreprocessText.TEXT, datatype="BYTES")
    tensor.shape.extend([1, 1])
    text.raw_input_contents.append(len(b"a cat").to_bytes(4, "little") + b"a cat")
    name = PreprocessText.NAME.encode()
    wrapped = (
        service_pb2.ModelInferRequest(model_name=EncodeText.NAME).SerializeToString()
        + text.SerializeToString()
        + b"\x8a\x80\x80\x80\x10"
        + bytes([len(name)])
        + name
    )
    counted = _request_counts(upstreams)
    with grpc.insecure_channel(upstreams[0].grpc_url) as channel:  # the reference: Triton itself runs it
        direct = channel.unary_unary(
            f"/{GRPC_SERVICE}/ModelInfer",
            request_serializer=lambda b: b,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        assert direct(wrapped, timeout=30).model_name == PreprocessText.NAME
    before = _settled_counts(upstreams, sum(counted) + 1)
    assert _raw_infer(gateway, wrapped)[0] == "StatusCode.PERMISSION_DENIED"
    for garbage in (b"", b"\xff\xff\xff", good[:-3], b"\x0a\x80", b"\x8a\x80\x80\x80\x80\x00\x01a"):  # unparsable
        assert _raw_infer(gateway, garbage)[0] == "StatusCode.INVALID_ARGUMENT", garbage
    # many tiny fields (a varint field 15 = 0 each) would make the walk long: refused past MAX_MESSAGE_FIELDS
    crowded = b"\x78\x00" * (MAX_MESSAGE_FIELDS + 1) + good
    assert _raw_infer(gateway, crowded) == (
        "StatusCode.INVALID_ARGUMENT",
        f"more than {MAX_MESSAGE_FIELDS} fields in one request message",
    )
    assert _request_counts(upstreams) == before
    assert _raw_infer(gateway, b"\x78\x00" * (MAX_MESSAGE_FIELDS - 8) + good)[0] == "OK"  # within the bound: served


# ------------------------------------------------------------------------------------------------ body cap
def test_body_cap_matches_the_item_limits(gateway, gateway_repository):
    cap = body_cap(repository_limits(gateway_repository))
    assert f"body cap {cap} bytes (from the upstreams' clip_info)" in "".join(gateway.output)
    items = LIMITS["max_items_per_request"]
    assert cap >= items * (LIMITS["max_text_bytes"] + LIMITS["max_image_bytes"])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_largest_legitimate_request_passes(gateway, gateway_repository, protocol):
    items = LIMITS["max_items_per_request"]
    side = int(((LIMITS["max_image_bytes"] - 128) / 3) ** 0.5)  # .npy header + side*side*3 <= max_image_bytes
    images = np.array([[_npy(side, side, i)] for i in range(items)], dtype=object)
    texts = np.array([[b"w" * LIMITS["max_text_bytes"]]] * items, dtype=object)
    assert all(len(x[0]) <= LIMITS["max_image_bytes"] for x in images)
    client = _client(gateway.http_url if protocol == "http" else gateway.grpc_url, protocol)
    out = infer(client, protocol, ZeroShot.NAME, {ZeroShot.TEXT: texts, ZeroShot.IMAGE: images}, [ZeroShot.PROBS])
    assert out[ZeroShot.PROBS].shape == (items, items)


def test_over_cap_body_refused_before_triton(gateway, upstreams, gateway_repository):
    cap = body_cap(repository_limits(gateway_repository))
    sent = {"envoy_cluster_name": "triton_http"}
    http_upstream_before = metric(gateway.metrics(), "envoy_cluster_upstream_rq_total", **sent)
    before = _settled_counts(upstreams, 0)
    status, body = _http(gateway, "POST", f"/v2/models/{EncodeImage.NAME}/infer", b"x" * (cap + 1))
    assert status == 413, body
    assert json.loads(body) == {"error": f"request body larger than the gateway's cap of {cap} bytes"}  # Triton's shape
    # gRPC: one image just over the cap (tritonclient frames it properly)
    image = grpcclient.InferInput(EncodeImage.IMAGE, [1, 1], "BYTES")
    image.set_data_from_numpy(np.array([[b"\x00" * cap]], dtype=object))
    err = _grpc_refused(lambda: grpcclient.InferenceServerClient(gateway.grpc_url).infer(EncodeImage.NAME, [image]))
    assert err.status() == "StatusCode.RESOURCE_EXHAUSTED", err
    assert f"larger than the gateway's cap of {cap} bytes" in err.message()
    assert _request_counts(upstreams) == before
    after = metric(gateway.metrics(), "envoy_cluster_upstream_rq_total", **sent)
    assert after == http_upstream_before


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "GZIP, identity"])
def test_compressed_bodies_refused(gateway, upstreams, encoding):
    """Triton inflates Content-Encoding bodies after the gateway counted their compressed size: refused (415)."""
    import gzip

    before = _settled_counts(upstreams, 0)
    body = gzip.compress(b"{" + b" " * 10_000_000 + b"}")  # ~10 KB on the wire, 10 MB inflated: far over the cap
    status, reply = _http(
        gateway, "POST", f"/v2/models/{EncodeText.NAME}/infer", body, **{"Content-Encoding": encoding}
    )
    assert status == 415, reply
    assert "Content-Encoding" in json.loads(reply)["error"]
    assert _request_counts(upstreams) == before
    status, _ = _http(gateway, "GET", "/v2/health/ready", **{"Content-Encoding": "identity"})
    assert status == 200  # identity is no compression


def test_gateway_refuses_a_port_in_use(upstreams, gateway):
    """A second gateway on a port another one serves fails at once and says which port (never shares it)."""
    upstream = f"127.0.0.1:{upstreams[0].http_port}:{upstreams[0].grpc_port}"
    with pytest.raises(RuntimeError) as info:
        start_gateway([upstream], "--max-body-bytes", "100000", "--http-port", str(gateway.http_port))
    assert f"--http-port {gateway.http_port} on 127.0.0.1 is in use" in str(info.value)


def test_memory_stays_bounded_under_concurrent_uploads(upstreams):
    """24 concurrent uploads of 30 MB (720 MB buffered without a bound) through a gateway bounded to 256 MiB of heap:
    Envoy's resident memory stays near the bound, refused uploads get 503 or are cut, and it serves again after."""
    heap, body = 256 * 1024**2, b"x" * (30 * 1024**2)
    gw = start_gateway(
        [f"127.0.0.1:{s.http_port}:{s.grpc_port}" for s in upstreams],
        "--max-body-bytes",
        str(32 * 1024**2),
        "--max-heap-bytes",
        str(heap),
    )
    try:
        envoy = psutil.Process(gw.proc.pid).children()[0]  # `clip-triton gateway` runs Envoy as its one child
        done = threading.Event()
        sampler = RssSampler(lambda: envoy.memory_info().rss, 0.02, done)

        def upload(_) -> bytes:
            try:
                with socket.create_connection(("127.0.0.1", gw.http_port), timeout=60) as sock:
                    sock.sendall(
                        f"POST /v2/models/{EncodeText.NAME}/infer HTTP/1.1\r\nHost: x\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n".encode()
                        + body
                    )
                    return sock.recv(64).split(b"\r\n")[0] or b"cut"  # closed without an answer: cut too
            except OSError:
                return b"cut"

        sampler.start()
        with ThreadPoolExecutor(24) as pool:
            outcomes = list(pool.map(upload, range(24)))
        done.set()
        sampler.join()
        peak_mib = max(rss for _, rss in sampler.samples) // 1024**2
        assert peak_mib < heap // 1024**2 + 200, (peak_mib, outcomes)
        assert all(o == b"cut" or o.startswith(b"HTTP/1.1 ") for o in outcomes), outcomes  # Triton answers the rest
        assert sum(o in (b"cut", b"HTTP/1.1 503 Service Unavailable") for o in outcomes) >= 4, (
            outcomes
        )  # the bound acted
        assert wait_until(lambda: _http(gw, "GET", "/v2/health/ready")[0] == 200, 10)  # serves again
    finally:
        assert gw.stop() == 0


# ------------------------------------------------------------------------------------------------ balancing
def _public_successes(server) -> float:
    return metric(scrape(server.metrics_url), "nv_inference_request_success", model=EncodeText.NAME)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_one_connection_is_spread_over_both_upstreams(gateway, upstreams, protocol):
    before = [_public_successes(s) for s in upstreams]
    client = _client(gateway.http_url if protocol == "http" else gateway.grpc_url, protocol)  # one connection
    for _ in range(24):
        infer(client, protocol, EncodeText.NAME, {EncodeText.TEXT: TEXTS[:1]}, [EncodeText.TEXT_EMBEDS])
    assert wait_until(lambda: sum(_public_successes(s) for s in upstreams) - sum(before) == 24, 10)
    served = [_public_successes(s) - b for s, b in zip(upstreams, before)]
    assert all(n >= 3 for n in served), served  # least-request per request, not per connection


# ------------------------------------------------------------------------------------------------ slow clients
def _seconds_until_closed(port: int, payload: bytes) -> tuple[float, bytes]:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        started = time.monotonic()
        sock.sendall(payload)
        sock.settimeout(30)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        return time.monotonic() - started, data


def test_idle_slow_and_half_sent_connections_are_closed(gateway):
    request = f"POST /v2/models/{EncodeText.NAME}/infer HTTP/1.1\r\nHost: x\r\n".encode()
    cases = {
        "idle": (b"", "--idle-timeout"),
        "half-sent headers": (request, "--headers-timeout"),
        "half-sent body": (request + b"Content-Length: 1000\r\n\r\n" + b"{" * 10, "--request-timeout"),
    }
    with ThreadPoolExecutor(len(cases)) as pool:
        results = dict(
            zip(cases, pool.map(partial(_seconds_until_closed, gateway.http_port), [p for p, _ in cases.values()]))
        )
    for name, (seconds, data) in results.items():
        limit = float(TIMEOUTS[cases[name][1]])
        assert limit - 0.5 <= seconds <= limit + 3, (name, seconds)
        assert data == b"" or data.startswith(b"HTTP/1.1 408"), (name, data[:80])


# ------------------------------------------------------------------------------------------------ rate limit
def test_per_client_rate_limit(upstreams):
    gw = start_gateway(
        [f"127.0.0.1:{s.http_port}:{s.grpc_port}" for s in upstreams], "--rate-limit", "1", "--rate-limit-burst", "3"
    )
    try:

        def statuses(source: str, n: int) -> list[int]:
            out = []
            for _ in range(n):
                conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=10, source_address=(source, 0))
                conn.request("GET", "/v2/health/live")
                out.append(conn.getresponse().status)
                conn.close()
            return out

        first = statuses("127.0.0.1", 6)
        assert first[:3] == [200, 200, 200] and 429 in first[3:], first
        status, body = _http(gw, "GET", "/v2/health/live")
        assert status == 429 and "rate limited at the gateway" in json.loads(body)["error"], (status, body)
        assert statuses("127.0.0.2", 3) == [200, 200, 200]  # another client address has its own bucket
    finally:
        assert gw.stop() == 0


# ------------------------------------------------------------------------------------------------ dashboard
def test_dashboard_queries_name_exported_metrics(gateway, upstreams):
    infer(
        _client(gateway.grpc_url, "grpc"),
        "grpc",
        ZeroShot.NAME,
        {ZeroShot.TEXT: TEXTS, ZeroShot.IMAGE: IMAGES},
        [ZeroShot.PROBS],
    )  # every model has served something
    exported = metric_names(scrape(upstreams[0].metrics_url)) | metric_names(gateway.metrics())
    assert not GPU_ONLY & exported  # the exemption covers only what a CPU-only server cannot show
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p.get("targets")]
    assert len(panels) >= 10
    for panel in panels:
        names = set().union(*(promql_metric_names(t["expr"]) for t in panel["targets"]))
        assert names, panel["title"]
        assert names <= exported | GPU_ONLY, (panel["title"], sorted(names - exported - GPU_ONLY))
    text = json.dumps(dashboard)
    assert "|".join(PUBLIC_MODELS) in text and "|".join(ENCODERS) in text  # model names as in the contract
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in (
        "requests/s",
        "errors",
        "p50",
        "p95",
        "p99",
        "queue",
        "batch size",
        "gpu utilisation",
        "gpu memory",
        "replicas",
    ):
        assert topic in titles, topic


# ------------------------------------------------------------------------------------------------ failover
def test_killing_an_upstream_causes_no_client_errors(gateway, upstreams):
    stop, errors, done = threading.Event(), [], {"http": 0, "grpc": 0}

    def loop(protocol: str):
        client = _client(gateway.http_url if protocol == "http" else gateway.grpc_url, protocol)
        while not stop.is_set():
            try:
                out = infer(client, protocol, EncodeText.NAME, {EncodeText.TEXT: TEXTS}, [EncodeText.TEXT_EMBEDS])
                assert out[EncodeText.TEXT_EMBEDS].shape[0] == len(TEXTS)
                done[protocol] += 1
            except Exception as exc:  # noqa: BLE001 - every client-visible error counts
                errors.append(f"{protocol}: {exc}")

    threads = [threading.Thread(target=loop, args=(p,)) for p in PROTOCOLS for _ in range(2)]
    for t in threads:
        t.start()
    try:
        assert wait_until(lambda: min(done.values()) >= 5, 30)
        victim = upstreams[1]
        victim.process.kill()  # SIGKILL: connections reset, in-flight requests lost
        victim.process.wait()
        counted = dict(done)
        assert wait_until(lambda: _healthy(gateway, 1), 15), "the dead upstream is still considered healthy"
        assert wait_until(lambda: all(done[p] >= counted[p] + 10 for p in PROTOCOLS), 30)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[:5]
    assert _public_successes(upstreams[0]) > 0
