"""A corrupting proxy between the clients and the real server: every broken answer is a typed error naming the
server, never a result; a dripping answer never outlasts the total deadline; statuses decide what is retried."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from clip_client import (
    CLIPClient,
    InvalidInputError,
    InvalidResponseError,
    ModelChangedError,
    ModelNotFoundError,
    RateLimitedError,
    ServerTimeoutError,
    ServerUnavailableError,
)
from clip_client._core import Infer
from clip_client._protocol import embed_request
from tests.integration.client_helpers import CorruptingProxy, make_client

MODES = ["sync", "async"]
TEXTS = ["a cat", "a dog", "a red car"]


@pytest.fixture(scope="module")
def proxy(triton_server):
    p = CorruptingProxy(triton_server.http_url)
    yield p
    p.close()


@pytest.fixture
def fresh(proxy, triton_server):
    """A client factory through the proxy (mode reset to pass-through first), closed afterwards."""
    made = []

    def make(mode: str, **options):
        proxy.mode = "pass"
        c = make_client(proxy.url, mode, **options)
        c.get_model_info()  # read through the proxy while it passes everything
        made.append(c)
        return c

    yield make
    proxy.mode = "pass"
    for c in made:
        c.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "corruption,what",
    [
        ("rows", "shaped"),
        ("dims", "7-dimensional"),
        ("nan", "not finite"),
        ("many", "shaped"),
        ("rename", "without output"),
    ],
)
def test_a_broken_answer_is_a_typed_error_naming_the_server(fresh, proxy, mode, corruption, what):
    c = fresh(mode, retries=0)
    proxy.mode = corruption
    with pytest.raises(InvalidResponseError, match=what) as info:
        c.encode_text(TEXTS)
    assert proxy.url in str(info.value) and info.value.url == proxy.url
    with pytest.raises(InvalidResponseError):
        c.encode_image(np.zeros((2, 16, 16, 3), np.uint8))


@pytest.mark.parametrize("mode", MODES)
def test_the_proxy_passes_good_answers(fresh, proxy, triton_server, mode):
    """The control: through the proxy in pass mode the answers are the server's own."""
    c = fresh(mode)
    with CLIPClient(triton_server.grpc_url) as direct:
        want = direct.encode_text(TEXTS)
    np.testing.assert_allclose(c.encode_text(TEXTS), want, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_a_dripping_answer_ends_at_the_total_deadline(fresh, proxy, mode):
    """The answer comes one byte per 50 ms (each read succeeds): timeout=2 still ends the call within ~2 s."""
    c = fresh(mode, timeout=2.0, retries=3)
    proxy.mode = "drip"
    t0 = time.monotonic()
    with pytest.raises(ServerTimeoutError, match="timed out"):
        c.encode_text(TEXTS)
    elapsed = time.monotonic() - t0
    assert 1.9 <= elapsed < 2.0 + 0.75, elapsed


@pytest.mark.parametrize("mode", MODES)
def test_an_answer_from_another_model_raises_model_changed_and_refreshes(fresh, proxy, mode):
    """The answer's model_id output differs from clip_info's: ModelChangedError, prompt cache dropped, info re-read.
    (The client skips the check with servers built without the output.)"""
    c = fresh(mode)
    probe = c.encode_text(TEXTS[:1])
    assert probe.shape[-1] == c.get_model_info().dim
    assert "model_id" in _outputs_of_encode_text(c)  # the identity travels with every answer (issue 20)
    c.class_embeddings(["cat", "dog"], ["a {}"])
    assert len(c.client._prompt_cache) == 2
    proxy.mode = "model_id"
    with pytest.raises(ModelChangedError, match="some-other-model"):
        c.encode_text(TEXTS)
    assert len(c.client._prompt_cache) == 0 and c.client._info is not None  # dropped, then re-read
    proxy.mode = "pass"
    assert c.encode_text(TEXTS).shape == (3, c.get_model_info().dim)


@pytest.mark.parametrize("mode", MODES)
def test_answers_without_model_id_are_taken_as_from_an_old_server(fresh, proxy, triton_server, mode):
    """A server built before the model_id output: no identity to check, the answers are used as they are."""
    c = fresh(mode)
    proxy.mode = "no_model_id"
    with CLIPClient(triton_server.grpc_url) as direct:
        want = direct.encode_text(TEXTS)
    np.testing.assert_allclose(c.encode_text(TEXTS), want, atol=1e-6)


def _outputs_of_encode_text(runner) -> set[str]:
    import http.client
    import json

    host, port = runner.client.endpoint.host, runner.client.endpoint.port
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/v2/models/encode_text")
    meta = json.loads(conn.getresponse().read())
    conn.close()
    return {o["name"] for o in meta.get("outputs", [])}


# ------------------------------------------------------------------------------------- statuses decide


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("code,kind", [(503, ServerUnavailableError), (429, RateLimitedError)])
def test_503_and_429_are_retried_then_answered(fresh, proxy, mode, code, kind, caplog):
    """A gateway's 503 / 429 for the first two requests: retried with backoff, then the server's answer."""
    c = fresh(mode, retries=3, backoff=0.05)
    proxy.mode = f"status:{code}:2"
    proxy._refused = 0
    with caplog.at_level(logging.WARNING, logger="clip_client"):
        out = c.encode_text(TEXTS)
    assert out.shape == (3, c.get_model_info().dim)
    retries = [r.getMessage() for r in caplog.records if "; retry " in r.getMessage()]
    assert len(retries) == 2 and all(f"[{code}]" in m for m in retries), retries
    proxy.mode, proxy._refused = f"status:{code}:9", 0
    with pytest.raises(kind):  # more refusals than retries: the typed error
        c.encode_text(TEXTS)


@pytest.mark.parametrize("mode", MODES)
def test_400_is_invalid_input_and_not_retried(fresh, proxy, mode):
    c = fresh(mode, retries=3, backoff=0.05)
    proxy.mode, proxy._refused = "status:400:9", 0
    before = proxy.seen
    with pytest.raises(InvalidInputError):
        c.encode_text(TEXTS)
    assert proxy.seen - before == 1


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("mode", MODES)
def test_real_server_statuses(triton_server, protocol, mode, caplog):
    """From the real server: NOT_FOUND / 404 for a model it does not serve -> ModelNotFoundError, not retried;
    INVALID_ARGUMENT / 400 for an undecodable image -> InvalidInputError with the server's words."""
    url = triton_server.grpc_url if protocol == "grpc" else triton_server.http_url
    not_found, invalid = (
        ("404", "400") if protocol == "http" else ("StatusCode.NOT_FOUND", "StatusCode.INVALID_ARGUMENT")
    )
    c = make_client(f"{protocol}://{url}", mode, retries=3, backoff=0.05)
    try:
        dim = c.get_model_info().dim
        caplog.set_level(logging.WARNING, logger="clip_client")
        with pytest.raises(ModelNotFoundError) as info:
            _send(c, embed_request("nosuch__", "text", [b"a cat"], dim))
        assert not [r for r in caplog.records if "retry" in r.getMessage()]  # every retry is logged: none
        assert info.value.status == not_found and url in str(info.value)
        with pytest.raises(InvalidInputError, match="image 0") as bad:
            c.encode_image([b"\xff\xd8\xff not a JPEG"])
        assert bad.value.status == invalid
        assert not [r for r in caplog.records if "retry" in r.getMessage()]
    finally:
        c.close()


def _send(runner, request):
    """One raw request through the client's core (its retries, deadline and checks)."""

    def plan():
        return (yield Infer(request))

    if runner.loop is None:
        return runner.client._run(plan())
    return runner.loop.run_until_complete(runner.client._run(plan()))


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_model_selection_by_name(triton_server, protocol):
    """model= picks a model of the repository by name; an unknown name is ModelNotFoundError listing the names."""
    url = triton_server.grpc_url if protocol == "grpc" else triton_server.http_url
    with CLIPClient(f"{protocol}://{url}") as default:
        info = default.get_model_info()
    with CLIPClient(f"{protocol}://{url}", model="no-such-model") as c, pytest.raises(ModelNotFoundError) as err:
        c.get_model_info()
    assert "no-such-model" in str(err.value)
    assert info.name  # clip_info names the model (issue 20)
    with CLIPClient(f"{protocol}://{url}", model=info.name) as named:
        assert named.get_model_info().model_id == info.model_id and named.get_model_info().prefix == ""


@pytest.mark.parametrize("mode", MODES)
def test_a_dripping_grpc_answer_ends_at_the_total_deadline(triton_server, mode):
    """gRPC: the server's bytes trickle through a relay one per 50 ms; timeout=2 ends the call within ~2 s."""
    from tests.integration.client_helpers import drip_relay

    relay = drip_relay(int(triton_server.grpc_url.rsplit(":", 1)[1]))
    c = make_client(f"grpc://127.0.0.1:{relay.port}", mode, timeout=2.0, retries=3)
    try:
        c.get_model_info()
        relay.drip = True
        t0 = time.monotonic()
        with pytest.raises(ServerTimeoutError):
            c.encode_text(TEXTS)
        elapsed = time.monotonic() - t0
        assert 1.9 <= elapsed < 2.0 + 0.75, elapsed
    finally:
        relay.drip = False
        c.close()
        relay.close()


def test_queue_policy_refusals_from_the_real_server_are_retried(triton_server, tmp_path, caplog):
    """A server whose queues hold one request: concurrent callers get its UNAVAILABLE refusals ("Exceeds maximum
    queue size"), which the client retries with backoff until every call is answered."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.integration.triton_helpers import repository_copy, serving

    repo = repository_copy(triton_server, tmp_path / "repo", max_queue_size=1, max_queue_delay_us=0)
    images = np.random.default_rng(5).integers(0, 256, size=(4, 240, 320, 3), dtype=np.uint8)
    with serving(repo, log_path=tmp_path / "tritonserver.log", exit_timeout=3) as server:
        with CLIPClient(server.grpc_url) as probe:
            want = probe.encode_image(images)
        clients = [CLIPClient(server.grpc_url, retries=30, backoff=0.05, timeout=120) for _ in range(8)]
        try:
            with caplog.at_level(logging.WARNING, logger="clip_client"), ThreadPoolExecutor(8) as pool:
                got = list(pool.map(lambda c: c.encode_image(images), clients))
        finally:
            for c in clients:
                c.close()
    for g in got:
        np.testing.assert_allclose(g, want, atol=1e-5)
    retried = [r.getMessage() for r in caplog.records if "; retry " in r.getMessage()]
    assert retried and all("[StatusCode.UNAVAILABLE]" in m for m in retried), retried[:3]
