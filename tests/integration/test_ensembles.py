"""Every public ensemble over HTTP and gRPC (raw tritonclient) against in-process transformers on the same
checkpoint."""

from __future__ import annotations

import io
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.integration.triton_helpers import infer, repository_copy, serving, wait_until

PROTOCOLS = ("http", "grpc")
TEXTS = [
    "a photo of a cat",
    "a photo of a dog",
    "a diagram",
    "ein Foto 🐱 mit Umlauten äöü",
    "x",
    "a much longer description of a scene with many different words in it, " * 8,
]  # > 77 tokens: truncated


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([128 + 100 * np.sin(7 * x + seed), 128 + 90 * np.cos(9 * y * x), 128 + 60 * np.sin(5 * y)], -1)
    return (img + rng.normal(0, 10, (h, w, 3))).clip(0, 255).astype(np.uint8)


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "NPY":
        np.save(buf, array)
    else:
        Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


IMAGES = [
    _encode(_photo(h, w, s), fmt)
    for s, (h, w, fmt) in enumerate(
        [(64, 64, "PNG"), (120, 80, "JPEG"), (45, 200, "WEBP"), (300, 301, "PNG"), (33, 40, "NPY")]
    )
]


def client_for(handle, protocol: str):
    if protocol == "http":
        return httpclient.InferenceServerClient(handle.http_url, network_timeout=120)
    return grpcclient.InferenceServerClient(handle.grpc_url)


def as_bytes_column(items: list[bytes | str]) -> np.ndarray:
    """[N, 1] BYTES tensor."""
    return np.array([[x.encode() if isinstance(x, str) else x] for x in items], dtype=object)


@pytest.fixture(scope="module")
def hf(triton_server):
    """In-process transformers on the same checkpoint: (model, tokenizer, image processor)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

        ckpt = str(triton_server.checkpoint_dir)  # PIL backend: what CLIPImageProcessor is without torchvision
        return (
            CLIPModel.from_pretrained(ckpt).eval(),
            AutoTokenizer.from_pretrained(ckpt),
            CLIPImageProcessorPil.from_pretrained(ckpt),
        )


@pytest.fixture(scope="module")
def reference(hf):
    """transformers' text/image features and zero-shot outputs for TEXTS x IMAGES."""
    model, tok, proc = hf
    pil = [
        Image.fromarray(np.load(io.BytesIO(b))) if b[:6] == b"\x93NUMPY" else Image.open(io.BytesIO(b)) for b in IMAGES
    ]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_in = tok(TEXTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        pixels = proc(images=pil, return_tensors="pt")["pixel_values"]
        text = model.get_text_features(**t_in)
        image = model.get_image_features(pixel_values=pixels)
        text = getattr(text, "pooler_output", text)
        image = getattr(image, "pooler_output", image)
        out = model(input_ids=t_in["input_ids"], attention_mask=t_in["attention_mask"], pixel_values=pixels)
    return {
        "text_embeds": text.numpy(),
        "image_embeds": image.numpy(),
        "logits_per_image": out.logits_per_image.numpy(),
        "logits_per_text": out.logits_per_text.numpy(),
        "probs": out.logits_per_image.softmax(dim=1).numpy(),
    }


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_encode_text_matches_transformers(triton_server, reference, protocol):
    client = client_for(triton_server, protocol)
    out = infer(client, protocol, "encode_text", {"text": as_bytes_column(TEXTS)}, ["text_embeds"])["text_embeds"]
    assert out.shape == reference["text_embeds"].shape and out.dtype == np.float32
    assert cosine(out, reference["text_embeds"]).min() >= 0.99999
    np.testing.assert_allclose(out, reference["text_embeds"], atol=1e-4, rtol=1e-3)
    client.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_encode_image_matches_transformers(triton_server, reference, protocol):
    client = client_for(triton_server, protocol)
    out = infer(client, protocol, "encode_image", {"image": as_bytes_column(IMAGES)}, ["image_embeds"])["image_embeds"]
    assert out.shape == reference["image_embeds"].shape and out.dtype == np.float32
    assert cosine(out, reference["image_embeds"]).min() >= 0.99999
    client.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_zero_shot_matches_transformers(triton_server, reference, protocol):
    client = client_for(triton_server, protocol)
    names = ["text_embeds", "image_embeds", "logits_per_image", "logits_per_text", "probs", "topk_texts", "topk_images"]
    k = 3
    out = infer(
        client,
        protocol,
        "zero_shot",
        {"text": as_bytes_column(TEXTS), "image": as_bytes_column(IMAGES), "top_k": np.array([k], np.int32)},
        names,
    )
    n_t, n_i = len(TEXTS), len(IMAGES)
    assert cosine(out["text_embeds"], reference["text_embeds"]).min() >= 0.99999
    assert cosine(out["image_embeds"], reference["image_embeds"]).min() >= 0.99999
    assert out["logits_per_image"].shape == (n_i, n_t) and out["logits_per_text"].shape == (n_t, n_i)
    np.testing.assert_allclose(out["logits_per_image"], reference["logits_per_image"], atol=1e-3, rtol=1e-4)
    np.testing.assert_allclose(out["logits_per_text"], reference["logits_per_text"], atol=1e-3, rtol=1e-4)
    np.testing.assert_allclose(out["probs"], reference["probs"], atol=1e-4)
    assert out["topk_texts"].dtype == np.int64 and out["topk_texts"].shape == (n_i, k)
    assert out["topk_images"].shape == (n_t, k)
    np.testing.assert_array_equal(out["topk_texts"], np.argsort(-reference["logits_per_image"], axis=1)[:, :k])
    np.testing.assert_array_equal(out["topk_images"], np.argsort(-reference["logits_per_text"], axis=1)[:, :k])
    client.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_zero_shot_top_k_optional_and_clamped(triton_server, protocol):
    client = client_for(triton_server, protocol)
    inputs = {"text": as_bytes_column(TEXTS[:2]), "image": as_bytes_column(IMAGES[:3])}
    out = infer(client, protocol, "zero_shot", inputs, ["topk_texts", "topk_images"])  # no top_k: default 5
    assert out["topk_texts"].shape == (3, 2) and out["topk_images"].shape == (2, 3)
    out = infer(client, protocol, "zero_shot", {**inputs, "top_k": np.array([1], np.int32)}, ["topk_texts"])
    assert out["topk_texts"].shape == (3, 1)
    client.close()


def _stats(client, model: str) -> tuple[int, int]:
    s = client.get_inference_statistics(model)["model_stats"][0]
    return int(s["inference_count"]), int(s["execution_count"])


@pytest.fixture(scope="module")
def batching_server(triton_server, tmp_path_factory):
    """A server of this module's own, so its statistics count this module's requests alone, whose encoders wait up
    to 2 s to fill a batch of 8: whether requests share executions then does not depend on the machine's speed (the
    session server's encoders wait 2 ms)."""
    from clip_build.tuning import encoder_tuning

    tuning = encoder_tuning("cpu", cores=2, max_batch_size=64, preferred=[8], queue_delay_us=2_000_000)
    repo = repository_copy(triton_server, tmp_path_factory.mktemp("batching") / "repo", tuning=tuning)
    with serving(repo, exit_timeout=2) as server:
        yield server


def _delta(client, model: str, before: tuple[int, int], n: int) -> tuple[int, int]:
    """(inferences, executions) of `model` since `before`, once its statistics count `n` inferences (Triton updates
    them a moment after the responses went out)."""
    assert wait_until(lambda: _stats(client, model)[0] - before[0] >= n, 10), model
    inferences, executions = _stats(client, model)
    return inferences - before[0], executions - before[1]


def test_concurrent_single_requests_are_batched(batching_server):
    """Many one-item requests at once: the encoders run fewer executions than inferences."""
    stats_client = httpclient.InferenceServerClient(batching_server.http_url)
    before = {m: _stats(stats_client, m) for m in ("text_encoder", "image_encoder")}
    n = 48

    def one(i: int):
        c = httpclient.InferenceServerClient(batching_server.http_url)  # not thread-safe: one per call
        try:
            t = infer(c, "http", "encode_text", {"text": as_bytes_column([f"photo number {i}"])}, ["text_embeds"])
            m = infer(
                c, "http", "encode_image", {"image": as_bytes_column([IMAGES[i % len(IMAGES)]])}, ["image_embeds"]
            )
            return t["text_embeds"].shape, m["image_embeds"].shape
        finally:
            c.close()

    with ThreadPoolExecutor(16) as pool:
        shapes = list(pool.map(one, range(n)))
    assert all(t[0] == 1 and m[0] == 1 for t, m in shapes)
    for model in ("text_encoder", "image_encoder"):
        inferences, executions = _delta(stats_client, model, before[model], n)
        print(f"{model}: {inferences} inferences in {executions} executions")
        assert inferences == n, model
        assert executions < n, f"{model}: {executions} executions for {inferences} inferences, no batching"
    stats_client.close()


# 3 to 42 tokens, every length different: an execution that serves two of them batched two lengths together
RAGGED_TEXTS = [" ".join(["cat"] * k) for k in (1, 2, 3, 5, 8, 13, 21, 40)]


def test_texts_of_different_lengths_share_batches_and_match_alone_and_transformers(triton_server, batching_server, hf):
    """Ragged batching (text_encoder's input_ids): requests of different lengths are batched together, and each
    row's embedding is the one it gets alone and the one transformers gives, whether the rows share one request
    (padded to its longest), ride in one batch of single-text requests, or come straight to text_encoder."""
    model, tok, _ = hf
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_in = tok(RAGGED_TEXTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        feats = model.get_text_features(**t_in)
    reference = getattr(feats, "pooler_output", feats).numpy()
    lengths = t_in["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == len(RAGGED_TEXTS)
    stats_client = httpclient.InferenceServerClient(batching_server.http_url)

    def text(items, protocol="http"):
        c = client_for(triton_server, protocol)
        try:
            return infer(c, protocol, "encode_text", {"text": as_bytes_column(items)}, ["text_embeds"])["text_embeds"]
        finally:
            c.close()

    def direct(i: int, protocol: str):  # one row of its own length, straight to the internal encoder
        c = client_for(batching_server, protocol)
        try:
            ids = t_in["input_ids"][i : i + 1, : lengths[i]].numpy()  # (1, L_i)
            return infer(
                c, protocol, "text_encoder", {"input_ids": ids, "lengths": np.array([[lengths[i]]])}, ["text_embeds__0"]
            )["text_embeds__0"][0]
        finally:
            c.close()

    alone = np.concatenate([text([t]) for t in RAGGED_TEXTS])
    together = text(RAGGED_TEXTS)  # one request: one execute, rows padded to the longest
    n = len(RAGGED_TEXTS)
    with ThreadPoolExecutor(n) as pool:
        singles = list(pool.map(lambda i: text([RAGGED_TEXTS[i]], PROTOCOLS[i % 2])[0], range(n)))
        np.testing.assert_allclose(np.stack(singles), alone, atol=1e-5, rtol=1e-4)
        before = _stats(stats_client, "text_encoder")
        rows = list(pool.map(lambda i: direct(i, PROTOCOLS[i % 2]), range(n)))  # n shapes [1, L_i]
    np.testing.assert_allclose(np.stack(rows), alone, atol=1e-5, rtol=1e-4)
    inferences, executions = _delta(stats_client, "text_encoder", before, n)
    print(f"text_encoder: {inferences} requests of {n} shapes in {executions} executions")
    assert inferences == n
    assert executions < n, "the batcher never merged requests of different lengths"  # every request its own shape
    for got in (alone, together):
        assert cosine(got, reference).min() >= 0.99999
        np.testing.assert_allclose(got, reference, atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=1e-4)
    stats_client.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_image_fails_alone(triton_server, reference, protocol):
    """A bad image sent concurrently with good ones fails its own request with a clear message."""
    bad = [b"this is not an image", _encode(_photo(40, 40, 1), "PNG")[:70], b"\x93NUMPY junk header"]
    jobs = [("good", i) for i in range(len(IMAGES))] + [("bad", i) for i in range(len(bad))]

    def one(job):
        kind, i = job
        c = client_for(triton_server, protocol)
        try:
            item = IMAGES[i] if kind == "good" else bad[i]
            return job, infer(c, protocol, "encode_image", {"image": as_bytes_column([item])}, ["image_embeds"])
        except InferenceServerException as exc:
            return job, exc
        finally:
            c.close()

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(one, jobs * 2))
    for (kind, i), result in results:
        if kind == "good":
            assert not isinstance(result, Exception), result
            assert cosine(result["image_embeds"][0], reference["image_embeds"][i]) >= 0.99999
        else:
            assert isinstance(result, InferenceServerException)
            message = result.message()
            assert "image 0:" in message and "Traceback" not in message, message
            assert str(result.status()) == {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}[protocol]
    client = client_for(triton_server, protocol)
    for model in triton_server.server.models:
        assert client.is_model_ready(model), model
    client.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_item_names_its_index(triton_server, protocol):
    client = client_for(triton_server, protocol)
    with pytest.raises(InferenceServerException, match=r"image 1: not a decodable image"):
        infer(
            client,
            protocol,
            "encode_image",
            {"image": as_bytes_column([IMAGES[0], b"junk", IMAGES[1]])},
            ["image_embeds"],
        )
    with pytest.raises(InferenceServerException, match=r"text 1: text is not valid UTF-8"):
        infer(
            client, protocol, "encode_text", {"text": as_bytes_column([b"fine", b"\xff\xfe broken"])}, ["text_embeds"]
        )
    ok = infer(client, protocol, "encode_text", {"text": as_bytes_column(["still fine"])}, ["text_embeds"])
    assert ok["text_embeds"].shape[0] == 1
    client.close()


def test_python_model_stubs_never_load_torch(triton_server):
    """One stub per model instance; only the encoders' stubs may map libtorch (stub memory)."""
    import psutil

    stubs = {}
    for pid in triton_server.server.pids()[1:]:
        cmd = psutil.Process(pid).cmdline()
        if len(cmd) > 1 and "triton_python_backend_stub" in cmd[0]:
            stubs[cmd[1].split("/")[-3]] = pid  # <repo>/<model>/1/<file>
    assert set(stubs) >= {"preprocess_text", "preprocess_image", "postprocess", "text_encoder", "image_encoder"}
    for model, pid in stubs.items():
        with open(f"/proc/{pid}/maps") as f:
            has_torch = "libtorch" in f.read()
        assert has_torch == model.endswith("_encoder"), model
    rss = triton_server.server.rss_bytes()  # the server and every stub
    assert 100e6 < rss < 1.5e9, rss  # DESIGN.md's budget for the whole server (ViT-B/32 size); tiny here
