"""Pure-logic tests of clip_client: input normalisation, chunking, embedding math, errors, gallery files, CLI."""

from __future__ import annotations

import io
import re
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from clip_client import CLIPClient, InvalidInputError, ModelNotFoundError, ServerUnavailableError, _core, ops
from clip_client.errors import ServerError, ServerTimeoutError
from clip_client.gallery import encode_tolerant, iter_image_files
from clip_client.inputs import (
    NPY_MAGIC,
    by_length,
    encode_images,
    image_item_bytes,
    iter_batches,
    iter_images,
    iter_texts,
    normalize_texts,
)
from tests.webserver import serve_folder

RNG = np.random.default_rng(0)


def _pixels(h=20, w=30):
    return RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _load_npy(b: bytes) -> np.ndarray:
    assert b.startswith(NPY_MAGIC)
    return np.load(io.BytesIO(b), allow_pickle=False)


# ------------------------------------------------------------------------------------------- texts


def test_texts_single_and_batch():
    assert normalize_texts("a cat") == ["a cat"]
    assert normalize_texts(["a", "b"]) == ["a", "b"]
    assert normalize_texts(("a", "b")) == ["a", "b"]
    assert normalize_texts([]) == []
    assert normalize_texts(t for t in "ab") == ["a", "b"]  # any iterable
    assert normalize_texts({"a": 1}.keys()) == ["a"]


def test_texts_are_read_lazily():
    pulled = []

    def gen():
        for i in range(1000):
            pulled.append(i)
            yield f"text {i}"

    it = iter_texts(gen())
    assert next(it) == "text 0" and pulled == [0]


@pytest.mark.parametrize("bad", [3, None, b"bytes", ["ok", 3], [None]])
def test_texts_rejected(bad):
    with pytest.raises(InvalidInputError):
        normalize_texts(bad)


# ------------------------------------------------------------------------------------------- images


def test_image_path_is_read_as_bytes(tmp_path):
    p = tmp_path / "x.png"
    Image.fromarray(_pixels()).save(p)
    assert image_item_bytes(p) == p.read_bytes()
    assert image_item_bytes(str(p)) == p.read_bytes()


def test_image_missing_or_empty_path(tmp_path):
    with pytest.raises(InvalidInputError, match="cannot read"):
        image_item_bytes(tmp_path / "nope.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(InvalidInputError, match="empty"):
        image_item_bytes(tmp_path / "empty.jpg")


def test_encoded_bytes_go_as_is():
    blob = b"\xff\xd8\xff\xe0 not checked by the client"
    assert image_item_bytes(blob) == blob
    assert image_item_bytes(bytearray(blob)) == blob
    assert image_item_bytes(memoryview(blob)) == blob


def test_uint8_array_goes_as_npy():
    px = _pixels()
    out = _load_npy(image_item_bytes(px))
    assert out.dtype == np.uint8 and np.array_equal(out, px)
    # non-contiguous views are serialised by value
    view = px[:, ::-1]
    assert np.array_equal(_load_npy(image_item_bytes(view)), view)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((4, 4, 3), np.float32),
        np.zeros((4, 4), np.uint8),
        np.zeros((4, 4, 4), np.uint8),
        np.zeros((0, 4, 3), np.uint8),
    ],
)
def test_bad_arrays_rejected(bad):
    with pytest.raises(InvalidInputError):
        image_item_bytes(bad)


def test_pil_rgb_is_exact_npy():
    px = _pixels()
    assert np.array_equal(_load_npy(image_item_bytes(Image.fromarray(px))), px)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "1"])
def test_pil_other_modes_are_lossless_png(mode):
    img = Image.fromarray(_pixels()).convert(mode)
    blob = image_item_bytes(img)
    assert blob.startswith(b"\x89PNG")
    back = Image.open(io.BytesIO(blob))
    assert back.mode == img.mode and np.array_equal(np.asarray(back), np.asarray(img))


def test_pil_cmyk_becomes_rgb_npy():
    img = Image.fromarray(_pixels()).convert("CMYK")
    assert np.array_equal(_load_npy(image_item_bytes(img)), np.asarray(img.convert("RGB")))


def test_image_batches(tmp_path):
    px = _pixels()
    stack = np.stack([px, px[::-1]])  # (2, H, W, 3)
    assert len(list(iter_images(stack))) == 2
    assert len(list(iter_images(px))) == 1
    assert len(list(iter_images(Image.fromarray(px)))) == 1
    assert len(list(iter_images(b"xx"))) == 1
    assert len(list(iter_images(str(tmp_path / "a.jpg")))) == 1
    assert len(list(iter_images(x for x in [px, px]))) == 2  # generators too
    p = tmp_path / "a.png"
    Image.fromarray(px).save(p)
    items = list(encode_images([p, px, Image.fromarray(px), p.read_bytes()]))
    assert items[0] == items[3] == p.read_bytes()
    assert items[1] == items[2]  # array and RGB PIL image: the same .npy bytes
    with pytest.raises(InvalidInputError, match=r"images\[1\]"):
        list(encode_images([p, 42]))
    with pytest.raises(InvalidInputError):
        list(iter_images(42))


@pytest.fixture()
def web(tmp_path):
    with serve_folder(tmp_path) as url:
        yield url


def test_image_urls_are_fetched_with_a_cap_and_a_timeout(web, tmp_path):
    p = tmp_path / "x.png"
    Image.fromarray(_pixels()).save(p)
    assert image_item_bytes(f"{web}/x.png") == p.read_bytes()
    assert image_item_bytes(f"HTTP://{web[7:]}/x.png") == p.read_bytes()  # schemes are case-insensitive
    with pytest.raises(InvalidInputError, match=rf"images\[0\]: {web}/x.png is \d+ bytes, more than the limit of 100"):
        list(encode_images([f"{web}/x.png"], max_download_bytes=100))  # Content-Length said so
    with pytest.raises(InvalidInputError, match=rf"{web}/big is more than the limit of 1000000 bytes"):
        image_item_bytes(f"{web}/big", max_download_bytes=1_000_000)  # no length: counted while reading
    with pytest.raises(InvalidInputError, match=rf"cannot fetch {web}/missing.jpg: HTTP 404"):
        image_item_bytes(f"{web}/missing.jpg")
    t0 = time.perf_counter()
    with pytest.raises(InvalidInputError, match=rf"cannot fetch {web}/slow: .*timed out"):
        image_item_bytes(f"{web}/slow", download_timeout=0.5)
    assert time.perf_counter() - t0 < 3
    with pytest.raises(InvalidInputError, match=rf"cannot fetch {web}/to-file"):
        image_item_bytes(f"{web}/to-file")  # only http(s): a redirect cannot read local files


def test_other_urls_and_odd_paths_keep_their_spelling(tmp_path):
    with pytest.raises(InvalidInputError, match=re.escape("'ftp://host/a.jpg': only http:// and https:// URLs")):
        image_item_bytes("ftp://host/a.jpg")
    odd = str(tmp_path) + "//sub//missing.jpg"
    with pytest.raises(InvalidInputError, match=re.escape(repr(odd))):  # the caller's own spelling, // included
        image_item_bytes(odd)


# ------------------------------------------------------------------------------------------- chunking


def _sizes(batches):
    return [[len(x) for x in b] for b in batches]


def test_iter_batches_basic():
    assert _sizes(iter_batches([b"a"] * 5, 2)) == [[1, 1], [1, 1], [1]]
    assert list(iter_batches([], 3)) == []
    ten, hundred = b"x" * 10, b"x" * 100
    assert _sizes(iter_batches([ten, ten, hundred, ten], 10, max_bytes=25)) == [[10, 10], [100], [10]]  # 100 alone


def test_iter_batches_stream():
    """A batch is handed out as soon as it is full: a generator is never read ahead by more than one item."""
    pulled = []

    def gen():
        for i in range(10**6):
            pulled.append(i)
            yield b"x"

    first = next(iter_batches(gen(), 4))
    assert len(first) == 4 and len(pulled) == 5  # the 5th item told that the batch was full


@given(st.lists(st.integers(1, 1000), max_size=300), st.integers(1, 70), st.one_of(st.none(), st.integers(1, 5000)))
def test_iter_batches_cover_in_order(sizes, max_items, max_bytes):
    items = [bytes([i % 256]) * n for i, n in enumerate(sizes)]
    batches = list(iter_batches(iter(items), max_items, max_bytes))
    assert [x for b in batches for x in b] == items  # every item once, in input order
    for b in batches:
        assert 1 <= len(b) <= max_items
        if max_bytes is not None and len(b) > 1:
            assert sum(map(len, b)) <= max_bytes


@given(st.lists(st.integers(0, 50), max_size=200), st.integers(1, 40))
def test_by_length_sorts_within_windows_and_records_the_order(sizes, window):
    items = [bytes([i % 256]) * n for i, n in enumerate(sizes)]
    order: list[int] = []
    out = list(by_length(iter(items), window, order))
    assert [items[i] for i in order] == out and sorted(order) == list(range(len(items)))  # a permutation, recorded
    for start in range(0, len(out), window):
        chunk = out[start : start + window]
        assert [len(x) for x in chunk] == sorted(len(x) for x in chunk)  # shortest first within each window
        assert sorted(order[start : start + window]) == list(range(start, start + len(chunk)))  # never across windows


# ------------------------------------------------------------------------------------------- math


def test_similarity_is_scaled_cosine():
    t, i = RNG.normal(size=(3, 8)), RNG.normal(size=(5, 8))
    expected = (t / np.linalg.norm(t, axis=1, keepdims=True)) @ (i / np.linalg.norm(i, axis=1, keepdims=True)).T
    np.testing.assert_allclose(ops.similarity(t, i), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ops.similarity(t, i, 100.0), 100 * expected, rtol=1e-5, atol=1e-4)
    assert ops.similarity(t[0], i).shape == (1, 5)
    with pytest.raises(InvalidInputError):
        ops.similarity(t, RNG.normal(size=(2, 7)))


def test_softmax_and_topk():
    z = np.array([[1.0, 3.0, 2.0, 3.0]], np.float32)
    p = ops.softmax(z)
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-6)
    assert ops.topk_indices(z, 3).tolist() == [[1, 3, 2]]  # tie keeps the lower index first
    assert ops.topk_indices(z, 10).shape == (1, 4)
    with pytest.raises(InvalidInputError):
        ops.topk_indices(z, 0)


def test_template_averaging_is_the_clip_recipe():
    c, t, d = 3, 4, 16
    prompts = RNG.normal(size=(c * t, d)).astype(np.float32)
    got = ops.class_embeddings(prompts, c, t)
    for k in range(c):
        block = prompts[k * t : (k + 1) * t]
        block = block / np.linalg.norm(block, axis=1, keepdims=True)
        mean = block.mean(axis=0)
        np.testing.assert_allclose(got[k], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)


def test_expand_templates():
    assert ops.expand_templates(["cat", "dog"], None) == ["cat", "dog"]
    assert ops.expand_templates(["cat", "dog"], ["a {}.", "the {}!"]) == ["a cat.", "the cat!", "a dog.", "the dog!"]
    assert ops.expand_templates(["x{y}"], ["a {}"]) == ["a x{y}"]  # braces in labels are harmless
    with pytest.raises(InvalidInputError):
        ops.expand_templates(["cat"], ["no placeholder"])


# ------------------------------------------------------------------------------------------- model info, errors


def _configs(params=None, mbs=64):
    post = {"name": "postprocess", "max_batch_size": 0, "parameters": params or {}}
    return {
        "postprocess": post,
        "encode_text": {
            "name": "encode_text",
            "max_batch_size": 0,
            "output": [{"name": "text_embeds", "data_type": "TYPE_FP32", "dims": ["-1", "512"]}],
        },
        "encode_image": {
            "name": "encode_image",
            "max_batch_size": 0,
            "output": [{"name": "image_embeds", "data_type": "TYPE_FP32", "dims": [-1, 512]}],
        },
        "preprocess_text": {
            "name": "preprocess_text",
            "max_batch_size": mbs,
            "parameters": {"max_items_per_request": {"string_value": "32"}},
        },
        "text_encoder": {"name": "text_encoder", "max_batch_size": mbs},
        "preprocess_image": {"name": "preprocess_image", "max_batch_size": mbs},
        "image_encoder": {"name": "image_encoder", "max_batch_size": 16},
    }


def test_model_info_from_configs():
    info = _core.build_model_info(
        _configs({"logit_scale": {"string_value": "4.6052"}, "model_id": {"string_value": "abc"}})
    )
    assert (info.model_id, info.dim, info.identity_source) == ("abc", 512, "postprocess.model_id")
    assert info.max_text_items == 32 and info.max_image_items == 16
    np.testing.assert_allclose(info.scale, np.exp(4.6052))
    assert set(info.identity()) == {"model_id", "dim", "logit_scale", "identity_source"}


def test_model_info_fallback_identity():
    a = _core.build_model_info(_configs({"logit_scale": {"string_value": "4.6052"}}))
    b = _core.build_model_info(_configs({"logit_scale": {"string_value": "2.0"}}))
    assert a.identity_source == "fallback" and a.model_id.startswith("cfg-") and a.model_id != b.model_id
    with pytest.raises(ServerError, match="logit_scale"):
        _core.build_model_info(_configs({}))
    assert _core.build_model_info(_configs({}), logit_scale=1.0).logit_scale == 1.0


def _fallback_clients(configs: dict, probe_scale: float = 2.5):
    """A CLIPClient and an AsyncCLIPClient without clip_info, whose configs and zero_shot answers are stubbed."""
    from clip_client import AsyncCLIPClient

    d = 512
    t, i = np.zeros((1, d), np.float32), np.zeros((1, d), np.float32)
    t[0, 0] = i[0, 0] = 1.0
    t[0, 1] = 1.0  # cosine 1/sqrt(2)
    answer = {"text_embeds": t, "image_embeds": i, "logits_per_text": np.array([[np.exp(probe_scale) / np.sqrt(2)]])}
    calls: list = []

    def request(req):
        if req.model == "clip_info":
            raise ModelNotFoundError("infer clip_info: not found")
        calls.append(req.model)
        assert req.model == "zero_shot" and set(req.inputs) == {"text", "image"}
        return req.check(answer, "grpc://127.0.0.1:1")

    async def arequest(req):
        return request(req)

    async def aconfig(name):
        return configs.get(name)

    sync, aio = CLIPClient("127.0.0.1:1"), AsyncCLIPClient("127.0.0.1:1")
    sync._request, sync._model_config = request, configs.get
    aio._request, aio._model_config = arequest, aconfig
    return sync, aio, calls


@pytest.mark.parametrize("params", [{"logit_scale": {"string_value": "4.6052"}}, {}], ids=["in-config", "probed"])
def test_model_info_config_fallback_same_in_both_clients(params):
    import asyncio

    sync, aio, calls = _fallback_clients(_configs(params))
    info = sync.get_model_info()
    assert info == asyncio.run(aio.get_model_info())
    assert info.logit_scale == pytest.approx(4.6052 if params else 2.5, abs=1e-4)
    assert calls == ([] if params else ["zero_shot", "zero_shot"])
    sync, aio, _ = _fallback_clients({"postprocess": _configs(params)["postprocess"]})
    with pytest.raises(ServerError, match="neither encode_text nor encode_image"):
        sync.get_model_info()
    with pytest.raises(ServerError, match="neither encode_text nor encode_image"):
        asyncio.run(aio.get_model_info())


def test_error_mapping_is_by_status_alone():
    """The same words under different statuses map differently; different words under one status map the same."""
    from tritonclient.utils import InferenceServerException as E

    from clip_client import ModelNotFoundError, RateLimitedError, _status

    table = {
        "StatusCode.UNAVAILABLE": ServerUnavailableError,
        "503": ServerUnavailableError,
        "StatusCode.CANCELLED": ServerUnavailableError,
        "429": RateLimitedError,
        "StatusCode.INVALID_ARGUMENT": InvalidInputError,
        "400": InvalidInputError,
        "413": InvalidInputError,
        "StatusCode.RESOURCE_EXHAUSTED": InvalidInputError,
        "StatusCode.NOT_FOUND": ModelNotFoundError,
        "404": ModelNotFoundError,
        "StatusCode.DEADLINE_EXCEEDED": ServerTimeoutError,
        "504": ServerTimeoutError,
        "StatusCode.INTERNAL": ServerError,
        "500": ServerError,
        "403": ServerError,
    }
    for words in ("rate limited", "has no available versions", "stub process is not healthy", "image 1: bad", "x"):
        for status, kind in table.items():
            err = _status.map_error(E(words, status), "infer m", "grpc://h:1")
            assert type(err) is kind, (words, status, err)
            assert err.status == status and err.url == "grpc://h:1"
    assert str(_status.map_error(E("bad image: not a JPEG", "400"), "x")) == "bad image: not a JPEG"  # verbatim
    assert isinstance(_status.map_error(ConnectionRefusedError(111, "refused"), "x"), ServerUnavailableError)
    assert isinstance(_status.map_error(TimeoutError(), "x"), ServerTimeoutError)
    # a model that answered before and now is NOT_FOUND is unloading (a restart): retried
    assert isinstance(_status.map_error(E("gone", "404"), "x", known_model=True), ServerUnavailableError)


def test_retry_policy_by_type_and_attempt():
    from clip_client import RateLimitedError, _status

    assert _status.retryable(ServerUnavailableError("x")) and _status.retryable(RateLimitedError("x"))
    assert not _status.retryable(InvalidInputError("x")) and not _status.retryable(ServerTimeoutError("x"))
    internal = ServerError("x")
    internal.status = "StatusCode.INTERNAL"  # a crashed stub answers INTERNAL until the server is restarted
    assert _status.retryable(internal)
    other = ServerError("x")
    other.status = "StatusCode.UNIMPLEMENTED"
    assert not _status.retryable(other)


def test_backoff_draws_half_jitter(monkeypatch):
    """backoff_delay is uniform(0.5, 1) x min(cap, base * 2**attempt), as its docstring says."""
    from clip_client import _status

    draws = []
    monkeypatch.setattr("random.uniform", lambda a, b: draws.append((a, b)) or b)
    assert [_status.backoff_delay(k, 0.5) for k in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0]
    assert set(draws) == {(0.5, 1.0)} and "uniform(0.5, 1)" in _status.backoff_delay.__doc__


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _encode_text(url: str, mode: str, **options):
    """encode_text("a cat") through a fresh CLIPClient or AsyncCLIPClient."""
    import asyncio

    from clip_client import AsyncCLIPClient

    if mode == "sync":
        with CLIPClient(url, **options) as c:
            return c.encode_text("a cat")

    async def go():
        async with AsyncCLIPClient(url, **options) as c:
            return await c.encode_text("a cat")

    return asyncio.run(go())


@pytest.mark.parametrize("scheme", ["grpc", "http", "grpcs", "https"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_never_reached_fails_fast_with_one_clear_message(scheme, mode, caplog):
    """Nothing listens: no retries, one message naming the address, the protocol and what to check."""
    url = f"{scheme}://127.0.0.1:{_closed_port()}"
    t0 = time.perf_counter()
    with pytest.raises(ServerUnavailableError) as info:
        _encode_text(url, mode, retries=6, backoff=0.5)
    assert time.perf_counter() - t0 < 5.0
    msg = str(info.value)
    assert msg.startswith(f"cannot reach a Triton server at {url} ({'gRPC' if scheme.startswith('grpc') else 'HTTP'}")
    assert re.search("refused|connect call failed", msg, re.I) and "Is the server running" in msg and "\n" not in msg
    assert ("TLS" in msg) == scheme.endswith("s")
    assert not [r for r in caplog.records if "retry" in r.getMessage()]  # never retried


def test_unreachable_message_names_the_other_protocols_port():
    from clip_common.endpoint import parse_endpoint

    msg = _core.unreachable_message(parse_endpoint("127.0.0.1:8000"), "x")
    assert msg.startswith("cannot reach a Triton server at grpc://127.0.0.1:8000 (gRPC): x.")
    assert "8000 is Triton's default HTTP port: use http://127.0.0.1:8000" in msg
    msg = _core.unreachable_message(parse_endpoint("https://h:9"), "y")
    assert "(HTTP with TLS): y." in msg and "Triton's defaults: HTTP 8000, gRPC 8001" in msg and "serve TLS" in msg


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_after_first_contact_failures_are_retried_and_logged(protocol, mode, caplog, monkeypatch):
    """Once a server answered (here: marked as reached), a lost server is retried with growing, logged delays."""
    from clip_client import AsyncCLIPClient

    monkeypatch.setattr(_core.ClientBase, "_reached", True, raising=False)
    monkeypatch.setattr(CLIPClient, "__init__", _reached_init(CLIPClient.__init__))
    monkeypatch.setattr(AsyncCLIPClient, "__init__", _reached_init(AsyncCLIPClient.__init__))
    t0 = time.perf_counter()
    with caplog.at_level("WARNING", logger="clip_client"), pytest.raises(ServerUnavailableError):
        _encode_text(f"{protocol}://127.0.0.1:{_closed_port()}", mode, retries=2, backoff=0.2, timeout=5)
    assert time.perf_counter() - t0 >= 0.3  # 2 retries: >= 0.1 + 0.2 with jitter in [0.5, 1]
    retries = [r for r in caplog.records if r.levelname == "WARNING" and "retry" in r.getMessage()]
    assert [m.getMessage().split("; retry ")[1][:3] for m in retries] == ["1/2", "2/2"]
    assert all(re.search("refused|connect call failed", r.getMessage(), re.I) for r in retries)  # each says why


def _reached_init(init):
    def wrapped(self, *a, **k):
        init(self, *a, **k)
        self._reached = True  # as if a server had answered before

    return wrapped


def test_client_options_validated():
    with pytest.raises(InvalidInputError):
        CLIPClient(protocol="websocket")
    with pytest.raises(InvalidInputError, match="unknown URL scheme 'ftp'"):
        CLIPClient("ftp://localhost:8000")
    with pytest.raises(InvalidInputError, match="is a grpc URL but protocol='http'"):
        CLIPClient("grpc://localhost:8001", protocol="http")
    with pytest.raises(InvalidInputError, match="ca_file is for TLS"):
        CLIPClient("grpc://localhost:8001", ca_file=__file__)
    with pytest.raises(InvalidInputError, match="not a file"):
        CLIPClient("grpcs://localhost:8001", ca_file="/no/such/ca.pem")
    assert CLIPClient("http://localhost:8000").protocol == "http"
    assert CLIPClient("localhost:8000", protocol="http").url == "http://localhost:8000"
    assert CLIPClient("localhost:9000").url == "grpc://localhost:9000"  # a bare host:port keeps the gRPC default
    assert CLIPClient().url == "grpc://127.0.0.1:8001"
    assert CLIPClient(protocol="http").url == "http://127.0.0.1:8000"
    c = CLIPClient("https://triton.example/v2prefix/")
    assert (c.protocol, c.endpoint.tls, c.endpoint.address, c.endpoint.effective_port) == (
        "http",
        True,
        "triton.example/v2prefix",
        443,
    )


@pytest.mark.parametrize(
    "url,expected",
    [
        ("http://h:1", ("http", False, "h:1")),
        ("HTTPS://h:2", ("http", True, "h:2")),
        ("grpc://h:3", ("grpc", False, "h:3")),
        ("grpcs://h:4", ("grpc", True, "h:4")),
        ("h:5", ("grpc", False, "h:5")),
        ("[::1]:6", ("grpc", False, "[::1]:6")),
        ("grpcs://[::1]", ("grpc", True, "[::1]")),
        ("http://h:7/", ("http", False, "h:7")),
    ],
)
def test_parse_endpoint(url, expected):
    from clip_common.endpoint import parse_endpoint

    e = parse_endpoint(url)
    assert (e.protocol, e.tls, e.address) == expected
    assert parse_endpoint(e.url) == e  # the canonical URL reads back the same


@pytest.mark.parametrize(
    "url,match",
    [
        ("ftp://h:1", "unknown URL scheme"),
        ("h:0", "port must be"),
        ("h:99999", "port must be"),
        ("h:x", "port must be"),
        ("grpc://h:1/path", "cannot have a path"),
        ("http://:80", "no host"),
        ("http://u:p@h:1", "credentials"),
    ],
)
def test_parse_endpoint_rejects(url, match):
    from clip_common.endpoint import EndpointError, parse_endpoint

    with pytest.raises(EndpointError, match=match):
        parse_endpoint(url)


def test_tritonclient_tls_options(tmp_path, monkeypatch):
    from clip_common.endpoint import parse_endpoint, tritonclient_tls

    assert tritonclient_tls(parse_endpoint("grpc://h:1")) == {} == tritonclient_tls(parse_endpoint("http://h:1"))
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    assert tritonclient_tls(parse_endpoint("grpcs://h:1"), str(ca)) == {"ssl": True, "root_certificates": str(ca)}
    assert tritonclient_tls(parse_endpoint("https://h:1"), str(ca)) == {
        "ssl": True,
        "ssl_options": {"ca_certs": str(ca)},
    }
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # the system's bundle, as OpenSSL finds it
    monkeypatch.delenv("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", raising=False)
    assert tritonclient_tls(parse_endpoint("grpcs://h:1"))["root_certificates"] == str(ca)
    assert tritonclient_tls(parse_endpoint("https://h:1"))["ssl_options"] == {"ca_certs": str(ca)}
    monkeypatch.setenv("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", str(ca))  # gRPC's own setting wins: gRPC reads it
    assert tritonclient_tls(parse_endpoint("grpcs://h:1"))["root_certificates"] is None


class _StubTextClient(CLIPClient):
    """CLIPClient whose encode_text is a deterministic function of each text (no server)."""

    def __init__(self, **options):
        super().__init__("127.0.0.1:1", **options)
        self.encoded: list[str] = []

        self._info = _core.ModelInfo("m", 8, 1.0, 64, 64)

    def _request(self, request):  # encode_text only: each text's embedding a deterministic function of it
        texts = [t.decode() for t in request.inputs["text"].reshape(-1)]
        self.encoded.extend(texts)
        out = np.stack([np.random.default_rng(list(t.encode())).normal(size=8) for t in texts]).astype(np.float32)
        return request.check({"text_embeds": out}, self.url)


def test_prompt_cache_smaller_than_the_prompts():
    """More prompts than prompt_cache_size: the class matrix is still built from all of them (was a KeyError)."""
    classes = [f"class {i}" for i in range(7)]
    templates = ["a {}.", "the {}!", "photo of {}"]
    big, small = _StubTextClient(), _StubTextClient(prompt_cache_size=4)
    want = big.class_embeddings(classes, templates)
    np.testing.assert_array_equal(small.class_embeddings(classes, templates), want)
    assert len(small._prompt_cache) == 4
    np.testing.assert_array_equal(small.class_embeddings(classes, templates), want)  # again, cache partly hit
    np.testing.assert_array_equal(_StubTextClient(prompt_cache_size=0).class_embeddings(classes, templates), want)
    before = len(big.encoded)
    np.testing.assert_array_equal(big.class_embeddings(classes, templates), want)
    assert len(big.encoded) == before  # all cached: nothing encoded again


def test_prompt_cache_shared_by_threads():
    """Threads sharing one client and a small cache evict each other's prompts: every result stays right."""
    from concurrent.futures import ThreadPoolExecutor

    templates = ["a {}.", "the {}!"]
    jobs = [[f"class {(i + j) % 11}" for j in range(5)] for i in range(40)]
    ref = _StubTextClient()
    want = [ref.class_embeddings(c, templates) for c in jobs]
    shared = _StubTextClient(prompt_cache_size=3)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda c: shared.class_embeddings(c, templates), jobs))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert len(shared._prompt_cache) <= 3


# ------------------------------------------------------------------------------------------- gallery


# The Gallery itself: tests/unit/test_gallery_local.py and tests/integration/test_gallery*.py.


def test_iter_image_files(tmp_path):
    for rel in ["b.jpg", "a/c.PNG", "a/notes.txt", ".hidden/d.jpg", "a/.e.jpg", "z/y.webp"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in iter_image_files(tmp_path)]
    assert found == ["b.jpg", "a/c.PNG", "z/y.webp"]


class _RejectingEncoder:
    """Stands in for the server's per-item verdict so the splitting bookkeeping can be checked exhaustively."""

    def __init__(self, hint: bool = False):
        self.calls, self.hint = 0, hint

    def encode_image(self, items):
        self.calls += 1
        bad = [i for i, b in enumerate(items) if b.startswith(b"bad")]
        if bad:
            where = f"image {bad[0]}: " if self.hint else ""
            raise InvalidInputError(f"{where}cannot decode {items[bad[0]].decode()}")
        return ops.l2_normalize(np.array([[len(b), 1.0] for b in items], np.float32))


@pytest.mark.parametrize("hint", [False, True])
def test_encode_tolerant_isolates_bad_items(hint):
    items = [b"ok" + b"x" * i for i in range(10)]
    items[3], items[7] = b"bad3", b"bad7"
    enc = _RejectingEncoder(hint)
    good, bad = encode_tolerant(enc, items)
    assert sorted(bad) == [3, 7] and bad[3] == ("image 0: " if hint else "") + "cannot decode bad3"
    assert sorted(good) == [i for i in range(10) if i not in (3, 7)]
    np.testing.assert_allclose(good[5], ops.l2_normalize(np.array([[7, 1.0]]))[0], rtol=1e-6)
    assert enc.calls <= (1 + 3 * 2 if hint else 1 + 2 * 2 * int(np.ceil(np.log2(10))))
    enc2 = _RejectingEncoder()
    good, bad = encode_tolerant(enc2, items[:3])
    assert len(good) == 3 and bad == {} and enc2.calls == 1  # a clean batch costs one request


# ------------------------------------------------------------------------------------------- CLI


def test_cli_arguments():
    from clip_client.cli import _parser

    p = _parser()
    a = p.parse_args(["index", "imgs", "--out", "g.gallery"])  # --out: the old name of --uri
    assert (a.image_dir, a.uri, a.url, a.protocol, a.ca_file) == ("imgs", "g.gallery", None, None, None)
    a = p.parse_args(["index", "imgs", "--uri", "http://milvus:19530?collection=photos", "--tag", "x", "--tag", "y"])
    assert (a.uri, a.tags, a.retry_failed) == ("http://milvus:19530?collection=photos", ["x", "y"], False)
    a = p.parse_args(["search", "a red car", "--gallery", "g.parquet", "-k", "3", "--filter", "size > 1"])
    assert (a.query, a.top_k, a.image, a.uri, a.filter) == ("a red car", 3, None, "g.parquet", "size > 1")
    a = p.parse_args(["search", "--image", "q.jpg", "--gallery", "g.parquet", "--protocol", "http"])
    assert (a.query, a.image, a.protocol) == (None, "q.jpg", "http")
    a = p.parse_args(
        [
            "classify",
            "x.jpg",
            "y.jpg",
            "--labels",
            "cat",
            "dog",
            "--template",
            "art of a {}",
            "--url",
            "grpcs://h:443",
            "--ca-file",
            "ca.pem",
        ]
    )
    assert (a.images, a.labels, a.templates, a.top_k) == (["x.jpg", "y.jpg"], ["cat", "dog"], ["art of a {}"], None)
    assert (a.url, a.ca_file) == ("grpcs://h:443", "ca.pem")


def _options_with_defaults(parser) -> list:
    """The options of a parser that take a value and have a default (0 included; not None / suppressed / [])."""
    import argparse

    return [
        a
        for a in parser._actions
        if a.option_strings
        and a.nargs != 0
        and a.default is not None
        and a.default is not argparse.SUPPRESS
        and a.default != []
    ]


def test_every_help_shows_the_defaults(capsys, monkeypatch):
    """clip-triton COMMAND --help shows each option's default (e.g. --dtype fp32, --max-batch-size 64, ports)."""
    from clip_client.cli import _parser, main

    monkeypatch.setenv("COLUMNS", "10000")  # one line per option: argparse would wrap long defaults at hyphens

    parser = _parser()
    sub = next(a for a in parser._actions if a.choices and "classify" in a.choices)
    assert {"index", "search", "classify", "build", "serve", "demo", "convert", "bench"} <= set(sub.choices)
    checked = 0
    for name, command in sub.choices.items():
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = " ".join(capsys.readouterr().out.split())  # line breaks undone
        for action in _options_with_defaults(command):
            shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
            flag = max(action.option_strings, key=len)
            part = text[text.index(flag, text.index("options:")) :]
            assert re.search(rf"\(?default:? {re.escape(shown)}\b", part), (name, flag, shown, part[:300])
            checked += 1
    assert checked > 30
    build = " ".join(_parser()._subparsers._group_actions[0].choices["build"].format_help().split())
    for expected in ("(default: fp32)", "(default: cpu)", "(default: 64)"):
        assert expected in build
    serve = " ".join(sub.choices["serve"].format_help().split())
    assert "--http-port HTTP_PORT default: 8000" in serve and "--grpc-port GRPC_PORT default: 8001" in serve
    assert "--log-verbose level (default: 0)" in serve  # a default equal to False is a default too
    assert "(default: 0)" in " ".join(sub.choices["convert"].format_help().split())  # --seed


def test_version(capsys):
    from importlib.metadata import version

    from clip_client.cli import main

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"clip-triton {version('clip-triton')}"


def test_cli_search_without_server_fails_cleanly(tmp_path, capsys):
    from clip_client.cli import main

    rc = main(["search", "--gallery", str(tmp_path / "g.parquet")])
    assert rc == 2 and "exactly one" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("k", [1.5, 2.0, True, np.bool_(True), "2", 0, -1, None])
def test_top_k_must_be_a_positive_int(k):
    scores = RNG.normal(size=(2, 5)).astype(np.float32)
    with pytest.raises(InvalidInputError, match="top_k"):
        ops.topk_indices(scores, k)
    client = CLIPClient("127.0.0.1:1")  # refused before any request
    emb = ops.l2_normalize(RNG.normal(size=(3, 8)).astype(np.float32))
    with pytest.raises(InvalidInputError, match="top_k"):
        client.find_best_matches(emb, emb, top_k=k)


def test_top_k_takes_any_integer_type():
    scores = np.array([[0.1, 0.9, 0.5]], np.float32)
    assert ops.topk_indices(scores, np.int64(2)).tolist() == [[1, 2]]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_embeddings_are_refused(bad):
    a = RNG.normal(size=(3, 8)).astype(np.float32)
    b = a.copy()
    b[1, 2] = bad
    with pytest.raises(InvalidInputError, match="not finite"):
        ops.similarity(a, b)
    client = CLIPClient("127.0.0.1:1")
    with pytest.raises(InvalidInputError, match="not finite"):
        client.find_best_matches(b, a, top_k=1)


def test_zero_norm_embeddings_are_refused():
    a = RNG.normal(size=(3, 8)).astype(np.float32)
    b = a.copy()
    b[0] = 0.0
    with pytest.raises(InvalidInputError, match="zero-norm"):
        ops.similarity(a, b)


@pytest.mark.parametrize("text", ["a \ud800 lone surrogate", "\udfff"])
def test_texts_that_are_not_valid_unicode_are_invalid_input(text):
    from clip_client.inputs import encode_texts

    with pytest.raises(InvalidInputError, match="not valid Unicode"):
        list(encode_texts([text]))
    with pytest.raises(InvalidInputError, match="not valid Unicode"):
        list(encode_texts(text))
    client = CLIPClient("127.0.0.1:1")
    with pytest.raises(InvalidInputError):
        client.class_embeddings(["cat"], [text + " {}"])


def test_sigmoid_scoring_uses_logit_bias():
    from clip_client._results import classify_result, ranked_labels

    img = ops.l2_normalize(RNG.normal(size=(2, 8)).astype(np.float32))
    cls = ops.l2_normalize(RNG.normal(size=(3, 8)).astype(np.float32))
    info = _core.ModelInfo("m", 8, np.log(10.0), 8, 8, scoring="sigmoid", logit_bias=-2.0)
    _, probs = classify_result(img, cls, info, True)
    want = 1 / (1 + np.exp(-(10.0 * (img @ cls.T) - 2.0)))
    np.testing.assert_allclose(probs, want, rtol=1e-5)
    rows = ranked_labels(img, cls, ["a", "b", "c"], info, None)
    assert [x["score"] for x in rows[0]] == pytest.approx(sorted(want[0], reverse=True), rel=1e-5)
    softmax = _core.ModelInfo("m", 8, np.log(10.0), 8, 8)
    _, p = classify_result(img, cls, softmax, True)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)


def test_client_commands_state_one_exit_status_rule(capsys):
    from clip_client.cli import EXIT_STATUS, main

    for command in ("index", "search", "classify"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert " ".join(capsys.readouterr().out.split()).endswith(" ".join(EXIT_STATUS.split())), command
