"""CLIPClient / AsyncCLIPClient against the real Triton server, checked against transformers in-process.

Every method, every input form, sync and async, gRPC and HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_client import AsyncCLIPClient, CLIPClient, CLIPClientError, InvalidInputError, ServerTimeoutError
from tests.integration.client_helpers import COMBOS, Runner, make_client
from tests.webserver import serve_folder

COS_MIN = 0.99999
TEXTS = ["a photo of a cat", "a red car", "Ünïcödé café — “quotes”", "日本語のテキスト", "word " * 100]
LABELS = ["cat", "dog", "bird", "red car"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of a {}.", "art of the {}"]


def _pattern(seed: int, size=(64, 48)) -> np.ndarray:
    """A smooth random colour pattern (uint8, (H, W, 3))."""
    g = np.random.default_rng(seed).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(g).resize(size, Image.BICUBIC))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict:
    """Test images in every input form, with the PIL image transformers sees for each."""
    d = tmp_path_factory.mktemp("client-images")
    arrays = [_pattern(s) for s in range(6)]
    png, jpg = d / "a.png", d / "b.jpg"
    Image.fromarray(arrays[0]).save(png)
    Image.fromarray(arrays[1]).save(jpg, quality=92)
    buf = io.BytesIO()
    Image.fromarray(arrays[2]).save(buf, format="PNG")
    gray = Image.fromarray(arrays[3]).convert("L")
    forms = {
        "path_str": (str(png), Image.open(png)),
        "path_obj": (jpg, Image.open(jpg)),
        "bytes": (buf.getvalue(), Image.open(io.BytesIO(buf.getvalue()))),
        "pil_rgb": (Image.fromarray(arrays[4]), Image.fromarray(arrays[4])),
        "pil_gray": (gray, gray),
        "ndarray": (arrays[5], Image.fromarray(arrays[5])),
    }
    return {"forms": forms, "arrays": arrays, "dir": d}


@pytest.fixture(scope="module")
def reference(triton_server):
    """transformers in-process: text/image features (unnormalised) and logit_scale of the served checkpoint."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    ckpt = str(triton_server.checkpoint_dir)
    model = CLIPModel.from_pretrained(ckpt).eval()
    proc = CLIPProcessor.from_pretrained(ckpt)

    def pooled(out):
        return out.pooler_output if hasattr(out, "pooler_output") else out

    class Ref:
        logit_scale = float(model.logit_scale.detach())
        dim = int(model.config.projection_dim)

        @staticmethod
        @torch.no_grad()
        def text(texts):
            t = proc.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
            return pooled(model.get_text_features(**t)).numpy()

        @staticmethod
        @torch.no_grad()
        def image(pils):
            px = proc.image_processor([p.convert("RGB") for p in pils], return_tensors="pt")["pixel_values"]
            return pooled(model.get_image_features(pixel_values=px)).numpy()

    return Ref


def _make(triton_server, protocol: str, mode: str, **options) -> Runner:
    url = triton_server.grpc_url if protocol == "grpc" else triton_server.http_url
    return make_client(f"{protocol}://{url}", mode, **options)


@pytest.fixture(scope="module", params=COMBOS, ids=lambda p: "-".join(p))
def client(request, triton_server):
    c = _make(triton_server, *request.param)
    yield c
    c.close()


@contextlib.contextmanager
def _models_called(runner: Runner, note=None):
    """The models the wrapped client sends inference requests to while the block runs, in order (and note(),
    when given, called at each request). The model info is read first, so the block's calls are the same in any
    test order."""
    runner.get_model_info()
    inner, calls = runner.client, []
    original = inner._request

    def record(request):
        calls.append(request.model)
        if note is not None:
            note()

    if inspect.iscoroutinefunction(original):

        async def spy(request):
            record(request)
            return await original(request)
    else:

        def spy(request):
            record(request)
            return original(request)

    inner._request = spy
    try:
        yield calls
    finally:
        del inner._request


def _cos(a, b) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def _norm(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------------- model info


def test_model_info(client, reference):
    info = client.get_model_info()
    assert info.dim == reference.dim
    assert info.logit_scale == pytest.approx(reference.logit_scale, abs=1e-5)
    assert info.max_text_items >= 1 and info.max_image_items >= 1
    assert info.model_id


# ------------------------------------------------------------------------------------------- encoding


def test_encode_text_matches_transformers(client, reference):
    got = client.encode_text(TEXTS)
    assert got.shape == (len(TEXTS), reference.dim) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    assert _cos(got, reference.text(TEXTS)).min() >= COS_MIN
    raw = client.encode_text(TEXTS, normalize=False)
    ref = reference.text(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(raw, axis=1), np.linalg.norm(ref, axis=1), rtol=1e-4)


def test_encode_text_single_and_empty(client, reference):
    one = client.encode_text("a photo of a cat")  # one str in: one (D,) embedding out
    assert one.shape == (reference.dim,) and one.dtype == np.float32
    assert _cos(one[None], reference.text(["a photo of a cat"]))[0] >= COS_MIN
    assert client.encode_text(["a photo of a cat"]).shape == (1, reference.dim)  # a list in: (N, D)
    assert client.encode_text([]).shape == (0, reference.dim)


@pytest.mark.parametrize("form", ["path_str", "path_obj", "bytes", "pil_rgb", "pil_gray", "ndarray"])
def test_encode_image_each_form(client, reference, images, form):
    item, pil = images["forms"][form]
    got = client.encode_image(item)  # one image in: (D,)
    assert got.shape == (reference.dim,)
    assert _cos(got[None], reference.image([pil]))[0] >= COS_MIN
    assert client.encode_image([item]).shape == (1, reference.dim)


def test_encode_image_batches(client, reference, images):
    forms = list(images["forms"].values())
    got = client.encode_image([item for item, _ in forms])  # mixed list, input order kept
    assert _cos(got, reference.image([pil for _, pil in forms])).min() >= COS_MIN
    stack = np.stack(images["arrays"])  # uint8 (N, H, W, 3)
    got = client.encode_image(stack)
    assert got.shape == (len(stack), reference.dim)
    assert _cos(got, reference.image([Image.fromarray(a) for a in stack])).min() >= COS_MIN
    raw = client.encode_image(stack, normalize=False)
    ref = reference.image([Image.fromarray(a) for a in stack])
    np.testing.assert_allclose(np.linalg.norm(raw, axis=1), np.linalg.norm(ref, axis=1), rtol=1e-4)


@pytest.mark.parametrize("protocol,mode", [("grpc", "sync"), ("http", "async")])
def test_big_batches_are_chunked_in_order(triton_server, reference, protocol, mode):
    """More items than one request may carry: split (here into chunks of 7), sent concurrently, order kept."""
    c = _make(triton_server, protocol, mode, max_items=7)
    try:
        texts = [f"photo number {i} of {'a cat' if i % 2 else 'a dog'}" for i in range(40)]
        got = c.encode_text(texts)
        assert _cos(got, reference.text(texts)).min() >= COS_MIN
        arrays = [_pattern(100 + i) for i in range(30)]
        got = c.encode_image(arrays)
        assert _cos(got, reference.image([Image.fromarray(a) for a in arrays])).min() >= COS_MIN
    finally:
        c.close()
    # the server's own limit: more texts than max_text_items in one call
    c = _make(triton_server, protocol, mode)
    try:
        n = c.get_model_info().max_text_items * 2 + 3
        texts = [f"text {i}" for i in range(n)]
        got = c.encode_text(texts)
        assert got.shape[0] == n
        assert _cos(got[-5:], reference.text(texts[-5:])).min() >= COS_MIN
    finally:
        c.close()


def test_sync_client_is_thread_safe(triton_server, reference):
    """One CLIPClient shared by threads (HTTP: one tritonclient per thread)."""
    c = CLIPClient(triton_server.http_url, protocol="http")
    expected = _norm(reference.text(TEXTS))
    errors: list = []

    def work(i):
        try:
            for _ in range(3):
                got = c.encode_text(TEXTS[i % len(TEXTS) :] + TEXTS[: i % len(TEXTS)])
                assert _cos(got, np.roll(expected, -(i % len(TEXTS)), axis=0)).min() >= COS_MIN
        except Exception as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    c.close()
    assert not errors, errors


def test_any_iterable_streams_in_batches(client, reference):
    """A generator is read batch by batch while requests are in flight (never all at once), order kept."""
    texts = [f"photo number {i} of {'a cat' if i % 2 else 'a dog'}" for i in range(23)]
    pulled: list[int] = []
    read_at_request: list[int] = []

    def gen():
        for i, t in enumerate(texts):
            pulled.append(i)
            yield t

    with _models_called(client, note=lambda: read_at_request.append(len(pulled))) as calls:
        got = client.encode_text(gen(), batch_size=3)
    assert got.shape == (len(texts), reference.dim)
    assert _cos(got, reference.text(texts)).min() >= COS_MIN
    assert calls == ["encode_text"] * 8  # ceil(23 / 3) requests of at most 3 texts
    # the first request left before the generator was read far: at most max_concurrency batches ahead (+1 item)
    assert read_at_request[0] <= 3 * client.client.max_concurrency + 1 < len(texts)


def test_batch_size_and_progress(client, reference, images, capsys):
    arrays = images["arrays"]  # 6 images
    with _models_called(client) as calls:
        got = client.encode_image(arrays, batch_size=4, show_progress=True)
    assert calls == ["encode_image", "encode_image"]  # 4 + 2
    assert _cos(got, reference.image([Image.fromarray(a) for a in arrays])).min() >= COS_MIN
    err = capsys.readouterr().err
    assert "6/6" in err and "encode_image" in err  # tqdm's bar, on stderr
    client.encode_text(["a", "b"])
    assert capsys.readouterr().err == ""  # no bar unless asked for
    with pytest.raises(InvalidInputError, match="batch_size"):
        client.encode_text(["a"], batch_size=0)


@pytest.fixture(scope="module")
def image_urls(images):
    """The test images' folder served over HTTP on 127.0.0.1."""
    with serve_folder(images["dir"]) as base:
        yield base


def test_image_urls_are_fetched_by_the_client(client, reference, images, image_urls):
    url = f"{image_urls}/a.png"
    one = client.encode_image(url)
    assert one.shape == (reference.dim,)
    assert _cos(one[None], reference.image([images["forms"]["path_str"][1]]))[0] >= COS_MIN
    both = client.encode_image([url, images["dir"] / "b.jpg"])  # URLs and paths mix
    np.testing.assert_allclose(both[0], one, atol=1e-6)
    with pytest.raises(InvalidInputError, match=rf"images\[0\]: cannot fetch {image_urls}/nope.png: HTTP 404"):
        client.encode_image([f"{image_urls}/nope.png"])


def test_image_url_fetch_has_a_total_deadline_and_urls_are_percent_encoded(triton_server, images, tmp_path):
    """A server dripping its body (30 bytes, one a second) cannot hold a call past the client's timeout (sync and
    async, at once); a URL with a space or non-ASCII characters is encoded, not refused; batch_size takes numpy ints."""
    for name in ("a photo.png", "caf\u00e9.png"):
        (tmp_path / name).write_bytes((images["dir"] / "a.png").read_bytes())
    results: dict = {}

    def run(mode: str, base: str) -> None:
        c = make_client(f"grpc://{triton_server.grpc_url}", mode, timeout=3)
        try:
            t0 = time.perf_counter()
            with pytest.raises(InvalidInputError) as info:
                c.encode_image(f"{base}/drip")
            results[mode] = (str(info.value), time.perf_counter() - t0)
            want = c.encode_image(images["dir"] / "a.png")
            for name in ("a photo.png", "caf\u00e9.png"):
                np.testing.assert_allclose(c.encode_image(f"{base}/{name}"), want, atol=1e-6)
            texts = ["a", "b", "c"]
            np.testing.assert_allclose(c.encode_text(texts, batch_size=np.int64(1)), c.encode_text(texts), atol=1e-6)
            results[mode] += ("done",)
        finally:
            c.close()

    with serve_folder(tmp_path) as base:
        threads = [threading.Thread(target=run, args=(mode, base)) for mode in ("sync", "async")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert set(results) == {"sync", "async"}, results
    for mode, (message, seconds, *done) in results.items():
        assert message == f"images[0]: cannot fetch {base}/drip: timed out after 3 s" and done, (mode, message)
        assert seconds < 4.5, (mode, seconds)


def test_precomputed_embeddings_are_accepted(client, images):
    arrays = images["arrays"][:3]
    t, i = client.encode_text(TEXTS), client.encode_image(arrays)
    np.testing.assert_allclose(client.compute_similarity(t, i), client.compute_similarity(TEXTS, arrays), atol=1e-5)
    np.testing.assert_allclose(client.compute_similarity(TEXTS, i), client.compute_similarity(t, arrays), atol=1e-5)
    np.testing.assert_array_equal(
        client.find_best_matches(t, i, top_k=2), client.find_best_matches(TEXTS, arrays, top_k=2)
    )
    np.testing.assert_array_equal(
        client.find_best_text_matches(i, t, top_k=2), client.find_best_text_matches(arrays, TEXTS, top_k=2)
    )
    one = client.find_best_text_matches(i[0], TEXTS, top_k=3)  # one (D,) embedding: one row
    np.testing.assert_array_equal(one, client.find_best_text_matches(arrays[:1], TEXTS, top_k=3))
    with _models_called(client) as calls:
        client.find_best_matches(t, i)
    assert calls == []  # nothing to encode


# ------------------------------------------------------------------------------------------- similarity, matching


@pytest.fixture(scope="module")
def zero_shot_ref(triton_server, images):
    """The zero_shot ensemble's own answer for TEXTS x the test arrays (the server-side computation)."""
    with CLIPClient(triton_server.grpc_url) as c:
        return c.zero_shot(images["arrays"], TEXTS, top_k=3)


def test_compute_similarity(client, reference, images, zero_shot_ref):
    t, i = client.encode_text(TEXTS), client.encode_image(images["arrays"])
    logits = client.compute_similarity(t, i)
    assert logits.shape == (len(TEXTS), len(images["arrays"]))
    np.testing.assert_allclose(logits, zero_shot_ref["logits_per_text"], atol=1e-3, rtol=1e-4)
    ref = (
        np.exp(reference.logit_scale)
        * _norm(reference.text(TEXTS))
        @ _norm(reference.image([Image.fromarray(a) for a in images["arrays"]])).T
    )
    np.testing.assert_allclose(logits, ref, atol=1e-3, rtol=1e-4)
    cos = client.compute_similarity(t, i, apply_temperature=False)
    np.testing.assert_allclose(cos * np.exp(reference.logit_scale), logits, rtol=1e-5, atol=1e-5)


def test_find_best_matches_equal_server_topk(client, images, zero_shot_ref):
    idx = client.find_best_matches(TEXTS, images["arrays"], top_k=3)
    np.testing.assert_array_equal(idx, zero_shot_ref["topk_images"])
    idx, scores = client.find_best_matches(TEXTS, images["arrays"], top_k=3, return_scores=True)
    assert np.all(np.diff(scores, axis=1) <= 0)
    idx = client.find_best_text_matches(images["arrays"], TEXTS, top_k=3)
    np.testing.assert_array_equal(idx, zero_shot_ref["topk_texts"])
    assert client.find_best_text_matches(images["arrays"][0], TEXTS, top_k=50).shape == (1, len(TEXTS))


# ------------------------------------------------------------------------------------------- zero-shot


def test_zero_shot_classification_matches_server_probs(client, images, triton_server):
    with CLIPClient(triton_server.grpc_url) as c:
        server = c.zero_shot(images["arrays"], LABELS, top_k=1)
    preds, probs = client.zero_shot_classification(images["arrays"], LABELS)
    assert probs.shape == (len(images["arrays"]), len(LABELS))
    np.testing.assert_allclose(probs, server["probs"], atol=1e-4)
    np.testing.assert_array_equal(preds, np.argmax(server["probs"], axis=1))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    preds2, none = client.zero_shot_classification(images["arrays"][0], LABELS, return_probabilities=False)
    assert none is None and preds2.tolist() == preds[:1].tolist()


def test_zero_shot_templates_average_and_cache(client, reference, images):
    _, probs = client.zero_shot_classification(images["arrays"], LABELS, templates=TEMPLATES)
    prompts = [t.replace("{}", c) for c in LABELS for t in TEMPLATES]
    e = _norm(reference.text(prompts)).reshape(len(LABELS), len(TEMPLATES), -1).mean(axis=1)
    cls = _norm(e)  # (C, D)
    img = _norm(reference.image([Image.fromarray(a) for a in images["arrays"]]))
    logits = np.exp(reference.logit_scale) * img @ cls.T
    ref = np.exp(logits - logits.max(axis=1, keepdims=True))
    ref /= ref.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, ref, atol=1e-4)

    # cached: the same prompts are not encoded again (only the images are sent)
    with _models_called(client) as calls:
        _, again = client.zero_shot_classification(images["arrays"], LABELS, templates=TEMPLATES)
    assert "encode_text" not in calls and "encode_image" in calls
    np.testing.assert_allclose(again, probs, atol=1e-6)


def test_classify_pipeline_shape_with_the_default_template(client, reference, images):
    """classify: per image [{label, score}] sorted by score; prompts "a photo of a {}." unless told otherwise."""
    from clip_client import DEFAULT_TEMPLATE

    arrays = images["arrays"]
    got = client.classify(arrays, LABELS)
    prompts = [DEFAULT_TEMPLATE.replace("{}", c) for c in LABELS]
    logits = (
        np.exp(reference.logit_scale)
        * _norm(reference.image([Image.fromarray(a) for a in arrays]))
        @ _norm(reference.text(prompts)).T
    )
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    assert len(got) == len(arrays)
    for row, p in zip(got, probs):
        assert [set(x) for x in row] == [{"label", "score"}] * len(LABELS)
        assert [x["score"] for x in row] == sorted((x["score"] for x in row), reverse=True)
        assert {x["label"]: x["score"] for x in row} == pytest.approx(dict(zip(LABELS, p.tolist())), abs=1e-4)
    single = client.classify(arrays[0], LABELS, top_k=2)  # one image in: one list
    assert [x["label"] for x in single] == [x["label"] for x in got[0][:2]]
    # bare labels: the original engine's zero_shot_classification, unchanged
    bare = client.classify(arrays, LABELS, templates=["{}"])
    _, zs = client.zero_shot_classification(arrays, LABELS)
    for row, p in zip(bare, zs):
        assert {x["label"]: x["score"] for x in row} == pytest.approx(dict(zip(LABELS, p.tolist())), abs=1e-5)


@pytest.mark.parametrize("protocol,mode", [("grpc", "sync"), ("http", "async")])
def test_prompt_cache_smaller_than_the_prompts(triton_server, images, protocol, mode):
    """More prompts than prompt_cache_size (and threads sharing the client): same answer as a big cache."""
    labels = LABELS + ["tree", "house", "boat"]  # 7 classes x 3 templates = 21 prompts, cache of 5
    big, small = _make(triton_server, protocol, mode), _make(triton_server, protocol, mode, prompt_cache_size=5)
    try:
        want = big.class_embeddings(labels, TEMPLATES)
        for _ in range(2):  # the second call finds some prompts in the cache
            np.testing.assert_allclose(small.class_embeddings(labels, TEMPLATES), want, atol=1e-6)
        assert len(small.client._prompt_cache) == 5
        _, probs = small.zero_shot_classification(images["arrays"], labels, templates=TEMPLATES)
        _, ref = big.zero_shot_classification(images["arrays"], labels, templates=TEMPLATES)
        np.testing.assert_allclose(probs, ref, atol=1e-5)
    finally:
        big.close()
        small.close()
    if mode == "sync":
        from concurrent.futures import ThreadPoolExecutor

        with CLIPClient(triton_server.grpc_url, prompt_cache_size=3) as shared, ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda k: shared.class_embeddings(labels[k:] + labels[:k], TEMPLATES), range(8)))
        for k, g in enumerate(got):
            np.testing.assert_allclose(g, np.roll(want, -(k % len(labels)), axis=0), atol=1e-6)


# ------------------------------------------------------------------------------------------- errors


def test_bad_image_is_reported_not_retried(client, images):
    with _models_called(client) as calls, pytest.raises(CLIPClientError) as info:
        client.encode_image([images["arrays"][0], b"\xff\xd8\xff this is not a JPEG"])
    err = info.value
    assert isinstance(err, InvalidInputError)  # carries the server's message verbatim
    assert "image 1" in str(err) and "Traceback" not in str(err) and not str(err).startswith("[")
    assert calls == ["encode_image"]  # one request: never retried


def test_client_side_input_errors(client):
    with pytest.raises(InvalidInputError):
        client.encode_text([1, 2])
    with pytest.raises(InvalidInputError):
        client.encode_image(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(InvalidInputError):
        client.encode_image(Path("/does/not/exist.jpg"))
    with pytest.raises(InvalidInputError):
        client.zero_shot_classification(np.zeros((8, 8, 3), np.uint8), [])


@pytest.mark.parametrize("protocol,mode", [("grpc", "sync"), ("http", "sync"), ("grpc", "async"), ("http", "async")])
def test_timeout_is_typed(triton_server, protocol, mode):
    with CLIPClient(triton_server.grpc_url) as probe:
        info = probe.get_model_info()
    c = _make(triton_server, protocol, mode, timeout=0.01, max_request_bytes=1 << 30)
    c.client._info = info  # skip the config reads, which may themselves miss a 10 ms deadline
    try:
        heavy = np.random.default_rng(0).integers(0, 256, size=(32, 480, 640, 3), dtype=np.uint8)
        with pytest.raises(ServerTimeoutError, match="timed out"):
            c.encode_image(heavy)  # 32 VGA images in one request take far longer than 10 ms on 2 CPU cores
    finally:
        c.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_async_client_survives_a_new_event_loop(triton_server, protocol):
    import gc
    import warnings

    url = triton_server.grpc_url if protocol == "grpc" else triton_server.http_url
    c = AsyncCLIPClient(url, protocol=protocol)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = asyncio.run(c.encode_text(["a cat"]))
        second = asyncio.run(c.encode_text(["a cat"]))  # another loop: the client reopens its connection
        asyncio.run(c.close())
        gc.collect()
    assert _cos(first, second)[0] >= COS_MIN
    # the previous loop's tritonclient was closed, not dropped (sockets of a closed loop's transports are
    # only released when collected: asyncio cannot close them once their loop is gone)
    left = [
        str(w.message) for w in caught if str(w.message).startswith(("Unclosed client session", "Unclosed connector"))
    ]
    assert not left, left


def test_async_close_while_reading_model_info(triton_server):
    """close() while get_model_info's request is in flight (held by a proxy until after the close): that call fails
    with a typed ServerUnavailableError (its connection was closed under it), and the client works again after."""
    from clip_client import ModelInfo, ServerUnavailableError
    from tests.integration.client_helpers import CorruptingProxy

    proxy = CorruptingProxy(triton_server.http_url)
    proxy.hold = "clip_info"

    async def go():
        c = AsyncCLIPClient(proxy.url, retries=0)
        task = asyncio.create_task(c.get_model_info())
        for _ in range(500):  # until the proxy holds the request (bounded: 10 s)
            if proxy.held.is_set():
                break
            await asyncio.sleep(0.02)
        assert proxy.held.is_set() and not task.done()
        await c.close()
        result = (await asyncio.gather(task, return_exceptions=True))[0]
        proxy.hold = None
        proxy.release.set()
        assert isinstance(result, ServerUnavailableError), repr(result)
        info = await c.get_model_info()  # usable again: reopens
        assert isinstance(info, ModelInfo) and info.dim > 0
        await c.close()

    try:
        asyncio.run(go())
    finally:
        proxy.release.set()
        proxy.close()


def test_a_sized_image_call_is_split_so_decoding_overlaps_encoding(client, images, reference):
    """A list of images goes out as two requests at least (the second's decoding runs while the first is encoded),
    never below 8 images a request; a generator (length unknown) and an explicit batch_size are sent as given."""
    arrays = images["arrays"]
    twenty = [arrays[i % len(arrays)] for i in range(20)]
    with _models_called(client) as calls:
        got = client.encode_image(twenty)
    assert calls == ["encode_image"] * 2  # 10 + 10
    want = reference.image([Image.fromarray(a) for a in twenty])
    assert _cos(got, want).min() >= COS_MIN
    with _models_called(client) as calls:
        client.encode_image(twenty[:5])
    assert calls == ["encode_image"]  # 5 < 2 x 8: one request
    with _models_called(client) as calls:
        client.encode_image(iter(twenty))
    assert calls == ["encode_image"]
    with _models_called(client) as calls:
        client.encode_image(twenty, batch_size=20)
    assert calls == ["encode_image"]
