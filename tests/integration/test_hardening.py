"""Bad input against the real server, always sent concurrently with good requests; limits; restricted admin APIs.

Contract: a bad request fails alone with a message saying what was wrong (no traceback text), its batch-mates get
exactly the embedding they get alone, every model stays ready, memory does not grow over many bad requests.
"""

from __future__ import annotations

import io
import json
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image, ImageOps
from tritonclient.utils import InferenceServerException

from clip_loadtest.hardening import png_header
from clip_server import TritonServer
from tests.integration.triton_helpers import infer, repository_copy, serving

PROTOCOLS = ("http", "grpc")
INVALID = ("400", "StatusCode.INVALID_ARGUMENT")


# ------------------------------------------------------------------------------------------------ inputs
def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([128 + 100 * np.sin(7 * x + seed), 128 + 90 * np.cos(9 * y * x), 128 + 60 * np.sin(5 * y)], -1)
    return (img + rng.normal(0, 10, (h, w, 3))).clip(0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def exif_rotated(array: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(array), "JPEG", quality=95, exif=exif.tobytes())


GOOD_IMAGES = [encode(Image.fromarray(photo(64, 48, 1)), "PNG"), encode(Image.fromarray(photo(90, 120, 2)), "JPEG")]
GOOD_TEXTS = ["a photo of a cat", "a diagram of a bridge"]
_jpeg = encode(Image.fromarray(photo(64, 64, 3)), "JPEG")
_png = encode(Image.fromarray(photo(64, 64, 4)), "PNG")

# (name, ensemble, item, regex the error message must match)
BAD = [
    ("empty image", "encode_image", b"", r"image 0: empty image"),
    ("not an image", "encode_image", b"%PDF-1.4 hello, this is no image at all", r"image 0: not a decodable image"),
    ("truncated JPEG", "encode_image", _jpeg[: len(_jpeg) // 2], r"image 0: cannot decode JPEG image: .*truncated"),
    ("truncated PNG", "encode_image", _png[: len(_png) // 2], r"image 0: cannot decode PNG image"),
    ("PNG bomb 50000x50000", "encode_image", png_header(50000, 50000), r"image 0: image has too many pixels"),
    (
        "PNG 8000x6000 header",
        "encode_image",
        png_header(8000, 6000),
        r"image 0: image is 8000x6000 = 48000000 pixels, more than the limit of 40000000",
    ),
    (
        "ICO (decoder not allowed)",
        "encode_image",
        encode(Image.fromarray(photo(32, 32)), "ICO"),
        r"image 0: not a decodable image \(allowed formats: JPEG, PNG, WEBP, BMP, GIF, TIFF",
    ),
    (
        "TGA (decoder not allowed)",
        "encode_image",
        encode(Image.fromarray(photo(32, 32)), "TGA"),
        r"not a decodable image",
    ),
    ("bad .npy", "encode_image", b"\x93NUMPY\x01\x00junk", r"image 0: bad .npy header"),
    (
        "float .npy",
        "encode_image",
        (lambda b: (np.save(b, np.zeros((4, 4, 3), np.float32)), b.getvalue())[1])(io.BytesIO()),
        r"must be uint8 with shape \(H, W, 3\)",
    ),
    ("invalid UTF-8", "encode_text", b"caf\xc3(", r"text 0: text is not valid UTF-8"),
    (
        "text over max_text_bytes",
        "encode_text",
        b"a" * 16385,
        r"text 0: text is 16385 bytes, more than the limit of 16384",
    ),
]


def client_for(url: str, protocol: str):
    if protocol == "http":
        return httpclient.InferenceServerClient(url, network_timeout=120, connection_timeout=120)
    return grpcclient.InferenceServerClient(url)


def column(items: list[bytes | str]) -> np.ndarray:
    return np.array([[x.encode() if isinstance(x, str) else x] for x in items], dtype=object)


def embed(url: str, protocol: str, kind: str, items: list) -> np.ndarray:
    c = client_for(url, protocol)
    try:
        if kind == "image":
            return infer(c, protocol, "encode_image", {"image": column(items)}, ["image_embeds"])["image_embeds"]
        return infer(c, protocol, "encode_text", {"text": column(items)}, ["text_embeds"])["text_embeds"]
    finally:
        c.close()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def assert_clean_error(exc: BaseException, pattern: str) -> None:
    import re

    assert isinstance(exc, InferenceServerException), repr(exc)
    msg = exc.message()
    assert re.search(pattern, msg), f"{msg!r} !~ {pattern!r}"
    assert "Traceback" not in msg and 'File "' not in msg, msg


def assert_all_ready(server: TritonServer) -> None:
    assert not server.not_ready_models()
    assert not server.dead_stubs()


def run_mixed(
    url: str, protocol: str, bad: list[tuple[str, str, bytes]], good_reference: dict, rounds: int = 2, threads: int = 8
) -> list:
    """bad [(ensemble, input, item)] and the good items, shuffled together and sent concurrently; checked here."""
    jobs = [("good", "encode_image", i) for i in range(len(GOOD_IMAGES))]
    jobs += [("good", "encode_text", i) for i in range(len(GOOD_TEXTS))]
    jobs += [("bad", model, i) for i, (model, _item, _p) in enumerate(bad)]
    jobs = jobs * rounds
    np.random.default_rng(0).shuffle(jobs)

    def one(job):
        kind, model, i = job
        c = client_for(url, protocol)
        try:
            if kind == "good":
                item = GOOD_IMAGES[i] if model == "encode_image" else GOOD_TEXTS[i]
            else:
                item = bad[i][1]
            name, out = ("image", "image_embeds") if model == "encode_image" else ("text", "text_embeds")
            return job, infer(c, protocol, model, {name: column([item])}, [out])[out]
        except Exception as exc:  # noqa: BLE001 - checked by the caller
            return job, exc
        finally:
            c.close()

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(one, jobs))
    for (kind, model, i), result in results:
        if kind == "good":
            assert not isinstance(result, Exception), result
            ref = good_reference[model][i]
            assert cosine(result[0], ref) >= 0.99999
            np.testing.assert_allclose(result[0], ref, atol=1e-5, rtol=1e-4)
        else:
            assert_clean_error(result, bad[i][2])
            assert str(result.status()) in INVALID, (bad[i], result.status())
    return results


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def hf(triton_server):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

        ckpt = str(triton_server.checkpoint_dir)
        return (
            CLIPModel.from_pretrained(ckpt).eval(),
            AutoTokenizer.from_pretrained(ckpt),
            CLIPImageProcessorPil.from_pretrained(ckpt),
        )


def hf_images(hf, images: list[Image.Image]) -> np.ndarray:
    """transformers' image features for RGB PIL images."""
    model, _tok, proc = hf
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.get_image_features(pixel_values=proc(images=images, return_tensors="pt")["pixel_values"])
    return getattr(out, "pooler_output", out).numpy()


def hf_texts(hf, texts: list[str]) -> np.ndarray:
    model, tok, _proc = hf
    with torch.no_grad():
        out = model.get_text_features(**tok(texts, padding=True, truncation=True, max_length=77, return_tensors="pt"))
    return getattr(out, "pooler_output", out).numpy()


@pytest.fixture(scope="module")
def alone(triton_server):
    """Each good item's embedding from a request made alone (HTTP)."""
    url = triton_server.http_url
    return {
        "encode_image": [embed(url, "http", "image", [b])[0] for b in GOOD_IMAGES],
        "encode_text": [embed(url, "http", "text", [t])[0] for t in GOOD_TEXTS],
    }


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_items_fail_alone_concurrently_with_good(triton_server, alone, protocol):
    bad = [(model, item, pattern) for _name, model, item, pattern in BAD]
    run_mixed(triton_server.http_url if protocol == "http" else triton_server.grpc_url, protocol, bad, alone)
    assert_all_ready(triton_server.server)


def test_bad_item_in_a_batch_fails_only_its_request(triton_server, alone):
    """Several bad items and good items in one request each, all at once: only the bad requests fail."""
    url = triton_server.http_url

    def one(i):
        items = [GOOD_IMAGES[0], GOOD_IMAGES[1]] + ([BAD[i % 5][2]] if i % 2 else [])
        try:
            return i, embed(url, "http", "image", items)
        except InferenceServerException as exc:
            return i, exc

    with ThreadPoolExecutor(6) as pool:
        for i, r in pool.map(one, range(12)):
            if i % 2:
                assert_clean_error(r, r"image 2: ")
            else:
                assert r.shape[0] == 2 and cosine(r[1], alone["encode_image"][1]) >= 0.99999


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_wrong_dtype_and_shape_are_refused_by_the_server(triton_server, alone, protocol):
    """Raw tritonclient: FP32 instead of BYTES, [N] instead of [N, 1], an unknown input name, a missing input."""
    url = triton_server.http_url if protocol == "http" else triton_server.grpc_url
    mod = httpclient if protocol == "http" else grpcclient
    c = client_for(url, protocol)
    cases = []
    t = mod.InferInput("text", [2, 1], "FP32")
    t.set_data_from_numpy(np.zeros((2, 1), np.float32))
    cases.append(("encode_text", [t], r"(?i)datatype|data type|FP32"))
    t = mod.InferInput("image", [2], "BYTES")
    t.set_data_from_numpy(np.array([GOOD_IMAGES[0], GOOD_IMAGES[1]], dtype=object))
    cases.append(("encode_image", [t], r"(?i)shape"))
    t = mod.InferInput("pictures", [1, 1], "BYTES")
    t.set_data_from_numpy(column([GOOD_IMAGES[0]]))
    cases.append(("encode_image", [t], r"pictures|expected 1 inputs|unexpected inference input"))
    cases.append(("encode_image", [], r"(?i)expected 1 inputs|missing|image"))
    for model, tensors, pattern in cases:
        with pytest.raises(InferenceServerException) as info:
            c.infer(model, tensors)
        assert_clean_error(info.value, pattern)
        assert str(info.value.status()) in INVALID, info.value.status()
    c.close()
    ok = embed(url, protocol, "image", [GOOD_IMAGES[0]])
    assert cosine(ok[0], alone["encode_image"][0]) >= 0.99999
    assert_all_ready(triton_server.server)


def test_too_many_items_are_refused(triton_server):
    url = triton_server.http_url
    c = client_for(url, "http")
    with pytest.raises(InferenceServerException) as info:  # 65 > max_batch_size 64 of preprocess_text
        infer(c, "http", "encode_text", {"text": column(["x"] * 65)}, ["text_embeds"])
    assert_clean_error(info.value, r"(?i)batch.size|more than the limit")
    with pytest.raises(InferenceServerException) as info:
        infer(c, "http", "encode_image", {"image": np.zeros((0, 1), dtype=object)}, ["image_embeds"])
    assert_clean_error(info.value, r"no image|got 0")
    c.close()
    assert embed(url, "http", "text", ["x"] * 64).shape[0] == 64
    assert_all_ready(triton_server.server)


# ------------------------------------------------------------------------------------------------ correct conversions
def _modes() -> list[tuple[str, bytes, Image.Image]]:
    """(name, encoded bytes, the RGB image transformers must see) for every conversion we document."""
    rgb = photo(72, 96, 7)
    base = Image.fromarray(rgb)
    white = Image.new("RGBA", base.size, (255, 255, 255, 255))
    cases = []
    g16 = photo(60, 80, 8)[..., 0].astype(np.uint16) * 257 + np.arange(80, dtype=np.uint16)[None, :] * 3
    img16 = Image.fromarray(g16)
    cases.append(
        (
            "16-bit greyscale PNG",
            encode(img16, "PNG"),
            Image.fromarray(((g16.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB"),
        )
    )
    cmyk = encode(base.convert("CMYK"), "JPEG", quality=95)
    cases.append(("CMYK JPEG", cmyk, Image.open(io.BytesIO(cmyk)).convert("RGB")))
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    cases.append(("palette PNG", encode(pal, "PNG"), pal.convert("RGB")))
    pal_t = pal.copy()
    pal_t.info["transparency"] = 3
    data = encode(pal_t, "PNG", transparency=3)
    cases.append(
        (
            "palette PNG + transparency",
            data,
            Image.alpha_composite(white, Image.open(io.BytesIO(data)).convert("RGBA")).convert("RGB"),
        )
    )
    cases.append(
        (
            "greyscale JPEG",
            encode(base.convert("L"), "JPEG", quality=95),
            Image.open(io.BytesIO(encode(base.convert("L"), "JPEG", quality=95))).convert("RGB"),
        )
    )
    rgba = base.copy()
    rgba.putalpha(Image.fromarray(np.linspace(0, 255, 96 * 72).reshape(72, 96).astype(np.uint8)))
    cases.append(("RGBA PNG", encode(rgba, "PNG"), Image.alpha_composite(white, rgba).convert("RGB")))
    la = base.convert("LA")
    cases.append(("LA PNG", encode(la, "PNG"), Image.alpha_composite(white, la.convert("RGBA")).convert("RGB")))
    for orientation in (3, 6, 8):
        data = exif_rotated(rgb, orientation)
        cases.append(
            (
                f"EXIF orientation {orientation}",
                data,
                ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"),
            )
        )
    cases.append(
        ("1x1 PNG", encode(Image.new("RGB", (1, 1), (200, 30, 40)), "PNG"), Image.new("RGB", (1, 1), (200, 30, 40)))
    )
    big = Image.fromarray(np.kron(photo(400, 600, 9), np.ones((10, 10, 1), np.uint8)))  # 6000x4000
    data = encode(big, "JPEG", quality=85)
    cases.append(("6000x4000 JPEG", data, Image.open(io.BytesIO(data)).convert("RGB")))
    return cases


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_image_modes_and_sizes_are_converted_correctly(triton_server, hf, alone, protocol):
    """Each mode sent concurrently with the others and with good requests; parity with transformers on the RGB."""
    cases = _modes()
    ref = hf_images(hf, [rgb for _n, _d, rgb in cases])
    url = triton_server.http_url if protocol == "http" else triton_server.grpc_url

    def one(i):
        if i >= len(cases):
            return i, embed(url, protocol, "image", [GOOD_IMAGES[i % 2]])
        return i, embed(url, protocol, "image", [cases[i][1]])

    with ThreadPoolExecutor(6) as pool:
        results = dict(pool.map(one, range(len(cases) + 6)))
    for i, out in results.items():
        if i >= len(cases):
            assert cosine(out[0], alone["encode_image"][i % 2]) >= 0.99999
            continue
        cos = cosine(out[0], ref[i])
        assert cos >= 0.99999, (cases[i][0], cos)


def test_texts_empty_and_far_over_the_token_limit(triton_server, hf):
    """Empty text is valid (BOS, EOS as the HF tokenizer); long texts are truncated to 77 tokens like HF."""
    long_text = " ".join(f"word{i} and more" for i in range(1500))[:16000]  # ~4000 tokens, under max_text_bytes
    texts = ["", long_text, "中" * 5000, "a photo of a cat"]
    out = embed(triton_server.grpc_url, "grpc", "text", texts)
    ref = hf_texts(hf, texts)
    assert cosine(out, ref).min() >= 0.99999
    alone = np.stack([embed(triton_server.http_url, "http", "text", [t])[0] for t in texts])
    np.testing.assert_allclose(out, alone, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ huge bodies, memory
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_huge_body_is_refused_and_the_server_survives(triton_server, protocol):
    """30 MB in one item: refused by max_image_bytes / max_text_bytes; 2.51 has no HTTP/gRPC body cap to rely on."""
    url = triton_server.http_url if protocol == "http" else triton_server.grpc_url
    big = b"\xff\xd8\xff" + bytes(30 * 1024 * 1024)
    c = client_for(url, protocol)
    with pytest.raises(InferenceServerException) as info:
        infer(c, protocol, "encode_image", {"image": column([big])}, ["image_embeds"])
    assert_clean_error(info.value, r"image 0: image is 31457283 bytes, more than the limit of 20971520")
    with pytest.raises(InferenceServerException) as info:
        infer(c, protocol, "encode_text", {"text": column([b"a" * (8 * 1024 * 1024)])}, ["text_embeds"])
    assert_clean_error(info.value, r"text 0: text is 8388608 bytes, more than the limit of 16384")
    c.close()
    assert embed(url, protocol, "text", ["still alive"]).shape[0] == 1
    assert_all_ready(triton_server.server)


def test_memory_is_flat_over_1000_bad_requests(triton_server):
    url = triton_server.http_url
    bad = [(m, item) for _n, m, item, _p in BAD if len(item) < 100_000]

    def burst(n: int, offset: int = 0) -> int:
        c = client_for(url, "http")
        failures = 0
        try:
            for k in range(n):
                model, item = bad[(k + offset) % len(bad)]
                name, out = ("image", "image_embeds") if model == "encode_image" else ("text", "text_embeds")
                try:
                    infer(c, "http", model, {name: column([item])}, [out])
                except InferenceServerException:
                    failures += 1
        finally:
            c.close()
        return failures

    server = triton_server.server
    with ThreadPoolExecutor(4) as pool:
        assert sum(pool.map(burst, [75] * 4, range(4))) == 300  # warm-up: allocator pools, caches
        before = server.rss_bytes()
        assert sum(pool.map(burst, [250] * 4, range(4))) == 1000
    after = server.rss_bytes()
    growth = after - before
    print(f"server+stubs RSS {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB over 1000 bad requests")
    assert growth <= max(30 * 2**20, 0.05 * before), (before, after)
    assert_all_ready(server)


# ------------------------------------------------------------------------------------- limits + restricted APIs
LIMITS = {
    "max_items_per_request": 4,
    "max_text_bytes": 64,
    "max_image_bytes": 60_000,
    "max_pixels": 500_000,
    "allowed_formats": ["PNG", "JPEG"],
}
ADMIN_KEY = "test-admin-key-123"


@pytest.fixture(scope="module")
def hardened(triton_server, tmp_path_factory):
    """A copy of the shared repository with tight limits (configs regenerated as `build --limit` writes them), served
    with the admin APIs restricted behind ADMIN_KEY."""
    repo = repository_copy(
        triton_server, tmp_path_factory.mktemp("hardened") / "repo", max_queue_delay_us=2000, limits=LIMITS
    )
    with serving(repo, admin_key=ADMIN_KEY, exit_timeout=2) as server:
        yield server


LIMIT_CASES = [
    ("encode_text", ["a", "b", "c", "d", "e"], r"5 texts in one request, more than the limit of 4"),
    ("encode_image", [_png] * 5, r"5 images in one request, more than the limit of 4"),
    ("encode_text", ["x" * 65], r"text 0: text is 65 bytes, more than the limit of 64"),
    (
        "encode_image",
        [encode(Image.fromarray(photo(300, 300)), "BMP")],
        r"image 0: image is 270054 bytes, more than the limit of 60000",
    ),
    (
        "encode_image",
        [png_header(1000, 600)],
        r"image 0: image is 1000x600 = 600000 pixels, more than the limit of 500000",
    ),
    (
        "encode_image",
        [encode(Image.fromarray(photo(40, 40)), "WEBP")],
        r"not a decodable image \(allowed formats: PNG, JPEG,",
    ),
    (
        "encode_image",
        [encode(Image.fromarray(photo(40, 40)), "GIF")],
        r"not a decodable image \(allowed formats: PNG, JPEG,",
    ),
]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_limit_is_enforced(hardened, protocol):
    url = hardened.http_url if protocol == "http" else hardened.grpc_url
    c = client_for(url, protocol)
    for model, items, pattern in LIMIT_CASES:
        name, out = ("image", "image_embeds") if model == "encode_image" else ("text", "text_embeds")
        with pytest.raises(InferenceServerException) as info:
            infer(c, protocol, model, {name: column(items)}, [out])
        assert_clean_error(info.value, pattern)
        assert str(info.value.status()) in INVALID
    # at the limits: fine
    assert (
        infer(c, protocol, "encode_text", {"text": column(["x" * 64] * 4)}, ["text_embeds"])["text_embeds"].shape[0]
        == 4
    )
    ok = infer(
        c,
        protocol,
        "encode_image",
        {"image": column([encode(Image.fromarray(photo(500, 1000)), "JPEG", quality=30)])},
        ["image_embeds"],
    )
    assert ok["image_embeds"].shape[0] == 1
    c.close()
    assert_all_ready(hardened)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_admin_apis_need_the_key(hardened, protocol):
    url = hardened.http_url if protocol == "http" else hardened.grpc_url
    c = client_for(url, protocol)
    kw = {"as_json": True} if protocol == "grpc" else {}
    for call in (
        lambda h: c.get_model_config("postprocess", headers=h, **kw),
        lambda h: c.get_inference_statistics("encode_text", headers=h, **kw),
        lambda h: c.get_model_repository_index(headers=h, **kw),
    ):
        with pytest.raises(InferenceServerException, match="restricted"):
            call(None)
        with pytest.raises(InferenceServerException, match="restricted"):
            call({"x-clip-admin-key": "wrong", "triton-grpc-protocol-x-clip-admin-key": "wrong"})
        assert call(hardened.admin_headers)
    # open: health, metadata, inference
    assert c.is_server_ready() and c.is_model_ready("encode_text")
    assert c.get_model_metadata("encode_text", **kw)
    config = c.get_model_config("postprocess", headers=hardened.admin_headers, **kw)
    config = config.get("config", config)
    assert (
        config["parameters"]["model_id"]["string_value"]
        == json.loads((hardened.repository / "clip_triton.json").read_text())["model_id"]
    )
    c.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_clip_client_works_with_admin_apis_restricted(hardened, hf, protocol):
    """Identity and limits come from clip_info; every client method works without the admin key."""
    from clip_client import AsyncCLIPClient, CLIPClient

    url = hardened.http_url if protocol == "http" else hardened.grpc_url
    images = [Image.fromarray(photo(50 + 10 * i, 70, i)) for i in range(6)]
    texts = [f"a photo of thing {i}" for i in range(10)]
    ref_t, ref_i = hf_texts(hf, texts), hf_images(hf, images)
    info = json.loads((hardened.repository / "clip_triton.json").read_text())
    with CLIPClient(url, protocol=protocol) as c:
        mi = c.get_model_info()
        assert mi.identity_source == "clip_info" and mi.model_id == info["model_id"]
        assert mi.max_text_items == mi.max_image_items == 4 and mi.dim == info["projection_dim"]
        assert mi.logit_scale == pytest.approx(info["logit_scale"])
        t = c.encode_text(texts, normalize=False)  # 10 texts: 3 requests of <= 4
        i = c.encode_image(images, normalize=False)
        assert cosine(t, ref_t).min() >= 0.99999 and cosine(i, ref_i).min() >= 0.99999
        sim = c.compute_similarity(c.encode_text(texts[:3]), c.encode_image(images[:2]))
        assert sim.shape == (3, 2)
        assert c.find_best_matches(texts[:3], images[:4], top_k=2).shape == (3, 2)
        assert c.find_best_text_matches(images[:2], texts[:3], top_k=2).shape == (2, 2)
        preds, probs = c.zero_shot_classification(images[:3], ["cat", "dog", "car"], templates=["a {}", "the {}"])
        assert preds.shape == (3,) and probs.shape == (3, 3)
        zs = c.zero_shot(images[:2], texts[:3], top_k=2)
        assert zs["probs"].shape == (2, 3)

    import asyncio

    async def go():
        async with AsyncCLIPClient(url, protocol=protocol) as ac:
            mi = await ac.get_model_info()
            assert mi.identity_source == "clip_info" and mi.max_text_items == 4
            t = await ac.encode_text(texts, normalize=False)
            assert cosine(t, ref_t).min() >= 0.99999
            preds, _ = await ac.zero_shot_classification(images[:3], ["cat", "dog"])
            assert preds.shape == (3,)

    asyncio.run(go())
