"""Pure-logic tests of clip_client: input normalisation, chunking, embedding math, errors, gallery files, CLI."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from clip_client import CLIPClient, InvalidInputError, ModelMismatchError, ServerUnavailableError
from clip_client import _core, ops
from clip_client.errors import ServerError, ServerTimeoutError
from clip_client.gallery import Gallery, encode_tolerant, gallery_schema, iter_image_files
from clip_client.inputs import (
    NPY_MAGIC,
    chunk_spans,
    encode_images,
    image_item_bytes,
    normalize_images,
    normalize_texts,
)

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


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8),
                                 np.zeros((4, 4, 4), np.uint8), np.zeros((0, 4, 3), np.uint8)])
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
    assert len(normalize_images(stack)) == 2
    assert len(normalize_images(px)) == 1
    assert len(normalize_images(Image.fromarray(px))) == 1
    assert len(normalize_images(b"xx")) == 1
    assert len(normalize_images(str(tmp_path / "a.jpg"))) == 1
    p = tmp_path / "a.png"
    Image.fromarray(px).save(p)
    items = encode_images([p, px, Image.fromarray(px), p.read_bytes()])
    assert items[0] == items[3] == p.read_bytes()
    assert items[1] == items[2]  # array and RGB PIL image: the same .npy bytes
    with pytest.raises(InvalidInputError, match=r"images\[1\]"):
        encode_images([p, 42])
    with pytest.raises(InvalidInputError):
        normalize_images(42)


# ------------------------------------------------------------------------------------------- chunking


def test_chunk_spans_basic():
    assert chunk_spans([1] * 5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert chunk_spans([], 3) == []
    assert chunk_spans([10, 10, 100, 10], 10, max_bytes=25) == [(0, 2), (2, 3), (3, 4)]  # 100 > 25 travels alone


@given(st.lists(st.integers(1, 1000), max_size=300), st.integers(1, 70), st.one_of(st.none(), st.integers(1, 5000)))
def test_chunk_spans_cover_in_order(sizes, max_items, max_bytes):
    spans = chunk_spans(sizes, max_items, max_bytes)
    flat = [i for a, b in spans for i in range(a, b)]
    assert flat == list(range(len(sizes)))  # every item once, in input order
    for a, b in spans:
        assert 1 <= b - a <= max_items
        if max_bytes is not None and b - a > 1:
            assert sum(sizes[a:b]) <= max_bytes


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
        block = prompts[k * t:(k + 1) * t]
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
        "encode_text": {"name": "encode_text", "max_batch_size": 0,
                        "output": [{"name": "text_embeds", "data_type": "TYPE_FP32", "dims": ["-1", "512"]}]},
        "encode_image": {"name": "encode_image", "max_batch_size": 0,
                         "output": [{"name": "image_embeds", "data_type": "TYPE_FP32", "dims": [-1, 512]}]},
        "preprocess_text": {"name": "preprocess_text", "max_batch_size": mbs,
                            "parameters": {"max_items_per_request": {"string_value": "32"}}},
        "text_encoder": {"name": "text_encoder", "max_batch_size": mbs},
        "preprocess_image": {"name": "preprocess_image", "max_batch_size": mbs},
        "image_encoder": {"name": "image_encoder", "max_batch_size": 16},
    }


def test_model_info_from_configs():
    info = _core.build_model_info(_configs({"logit_scale": {"string_value": "4.6052"}, "model_id": {"string_value": "abc"}}))
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

    def infer(model, inputs, outputs):
        calls.append(model)
        assert model == "zero_shot" and set(inputs) == {"text", "image"}
        return answer

    async def ainfer(model, inputs, outputs):
        return infer(model, inputs, outputs)

    async def aconfig(name):
        return configs.get(name)

    async def anone():
        return None

    sync, aio = CLIPClient("127.0.0.1:1"), AsyncCLIPClient("127.0.0.1:1")
    sync._clip_info, sync._model_config, sync._infer = (lambda: None), configs.get, infer
    aio._clip_info, aio._model_config, aio._infer = anone, aconfig, ainfer
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


def test_error_mapping():
    from tritonclient.utils import InferenceServerException as E

    assert isinstance(_core.map_error(E("bad image", "StatusCode.INVALID_ARGUMENT"), "x"), InvalidInputError)
    assert str(_core.map_error(E("bad image: not a JPEG", "400"), "x")) == "bad image: not a JPEG"
    assert isinstance(_core.map_error(E("down", "StatusCode.UNAVAILABLE"), "x"), ServerUnavailableError)
    assert isinstance(_core.map_error(ConnectionRefusedError(111, "refused"), "x"), ServerUnavailableError)
    assert isinstance(_core.map_error(E("slow", "StatusCode.DEADLINE_EXCEEDED"), "x"), ServerTimeoutError)
    assert isinstance(_core.map_error(TimeoutError(), "x"), ServerTimeoutError)
    # per-item rejections reported as INTERNAL by the Python models are still input errors, message verbatim
    msg = "in ensemble 'encode_image', image 1: not a decodable image"
    for status in ("StatusCode.INTERNAL", "500"):
        err = _core.map_error(E(msg, status), "x")
        assert isinstance(err, InvalidInputError) and str(err) == msg
    assert type(_core.map_error(E("image 0: internal error while preprocessing (KeyError)", "500"), "x")) is ServerError
    internal = _core.map_error(E("boom", "StatusCode.INTERNAL"), "x")
    assert type(internal) is ServerError and "boom" in str(internal)
    assert _core.retryable(ServerUnavailableError("x"))
    assert not _core.retryable(InvalidInputError("x")) and not _core.retryable(ServerTimeoutError("x"))


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_retries_with_backoff_then_unavailable(protocol):
    """A closed port: retried `retries` times with growing delays, then ServerUnavailableError."""
    import socket

    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = CLIPClient(f"127.0.0.1:{port}", protocol=protocol, retries=2, backoff=0.2, timeout=5)
    t0 = time.perf_counter()
    with pytest.raises(ServerUnavailableError):
        c.encode_text("a cat")
    assert time.perf_counter() - t0 >= 0.3  # 2 retries: >= 0.1 + 0.2 with jitter in [0.5, 1]
    c.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_async_retries_then_unavailable(protocol):
    import asyncio
    import socket

    from clip_client import AsyncCLIPClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def go():
        async with AsyncCLIPClient(f"127.0.0.1:{port}", protocol=protocol, retries=1, backoff=0.05, timeout=5) as c:
            with pytest.raises(ServerUnavailableError):
                await c.encode_image(np.zeros((8, 8, 3), np.uint8))

    asyncio.run(go())


def test_client_options_validated():
    with pytest.raises(InvalidInputError):
        CLIPClient(protocol="websocket")
    assert CLIPClient("http://localhost:8000", protocol="http").url == "localhost:8000"
    assert CLIPClient().url == "127.0.0.1:8001"


class _StubTextClient(CLIPClient):
    """CLIPClient whose encode_text is a deterministic function of each text (no server)."""

    def __init__(self, **options):
        super().__init__("127.0.0.1:1", **options)
        self.encoded: list[str] = []

    def encode_text(self, texts, normalize=True):
        self.encoded.extend(texts)
        out = np.stack([np.random.default_rng(list(t.encode())).normal(size=8) for t in texts]).astype(np.float32)
        return ops.l2_normalize(out) if normalize else out


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


IDENTITY = {"model_id": "m1", "dim": 4, "logit_scale": 4.6, "identity_source": "postprocess.model_id"}


def test_gallery_parquet_schema_and_roundtrip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    g = Gallery(identity=dict(IDENTITY))
    emb = RNG.normal(size=(3, 4)).astype(np.float32)
    g.add(["/a.jpg", "/b.jpg", "/c.jpg"], ["s1", "s2", "s3"], [10, 20, 30], emb)
    path = tmp_path / "g.parquet"
    g.save(path)
    schema = pq.read_schema(path)
    assert schema.field("path").type == pa.string()
    assert schema.field("sha256").type == pa.string()
    assert schema.field("size").type == pa.int64()
    assert schema.field("embedding").type == pa.list_(pa.float32(), 4)  # fixed_size_list<float32>[4]
    meta = json.loads(schema.metadata[b"clip_triton_gallery"])
    assert meta == {"format_version": 1, **IDENTITY}
    assert schema.remove_metadata().equals(gallery_schema(4, IDENTITY).remove_metadata())
    back = Gallery.load(path)
    assert back.paths == g.paths and back.sha256 == g.sha256 and back.sizes == [10, 20, 30]
    np.testing.assert_allclose(np.linalg.norm(back.embeddings, axis=1), 1.0, rtol=1e-6)  # stored normalised
    np.testing.assert_allclose(back.embeddings, ops.l2_normalize(emb), rtol=1e-6)
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file


def test_gallery_replace_search_identity(tmp_path):
    g = Gallery(identity=dict(IDENTITY))
    e = np.eye(4, dtype=np.float32)
    g.add(["/a", "/b", "/c"], ["1", "2", "3"], [1, 1, 1], e[:3])
    g.add(["/b"], ["2b"], [2], e[3:4])  # same path, new content: replaced
    assert g.paths == ["/a", "/c", "/b"] and g.sha256 == ["1", "3", "2b"]
    idx, scores = g.search(np.array([0.1, 0, 0.2, 1.0]), k=2)
    assert [g.paths[i] for i in idx[0]] == ["/b", "/c"]
    assert scores[0, 0] > scores[0, 1]
    g.check_identity(dict(IDENTITY))
    with pytest.raises(ModelMismatchError, match="re-index"):
        g.check_identity({**IDENTITY, "model_id": "other"})
    with pytest.raises(ModelMismatchError):
        g.search(np.ones((1, 8)))
    empty = Gallery(identity=dict(IDENTITY))
    assert empty.search(np.ones(4), 3)[0].shape == (1, 0)


def test_gallery_load_rejects_other_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    with pytest.raises(InvalidInputError, match="not a clip-triton gallery"):
        Gallery.load(tmp_path / "other.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"junk")
    with pytest.raises(InvalidInputError):
        Gallery.load(tmp_path / "junk.parquet")


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
    a = p.parse_args(["index", "imgs", "--out", "g.parquet"])
    assert (a.image_dir, a.out, a.url, a.protocol) == ("imgs", "g.parquet", None, "grpc")
    a = p.parse_args(["search", "a red car", "--gallery", "g.parquet", "-k", "3"])
    assert (a.query, a.top_k, a.image) == ("a red car", 3, None)
    a = p.parse_args(["search", "--image", "q.jpg", "--gallery", "g.parquet", "--protocol", "http"])
    assert (a.query, a.image, a.protocol) == (None, "q.jpg", "http")
    a = p.parse_args(["classify", "x.jpg", "y.jpg", "--labels", "cat", "dog", "--template", "a photo of a {}."])
    assert (a.images, a.labels, a.templates) == (["x.jpg", "y.jpg"], ["cat", "dog"], ["a photo of a {}."])


def test_cli_search_without_server_fails_cleanly(tmp_path, capsys):
    from clip_client.cli import main

    rc = main(["search", "--gallery", str(tmp_path / "g.parquet")])
    assert rc == 2 and "exactly one" in capsys.readouterr().err
