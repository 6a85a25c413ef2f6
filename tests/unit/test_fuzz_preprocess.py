"""Property-based fuzzing of the stub-side preprocessing: random and mutated bytes, random strings.

The contract: every input either preprocesses to the documented shape or raises our InvalidInputError; never any
other exception (which the Python models would have to report as an INTERNAL error) and never a crash or a hang.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from clip_runtime.errors import InvalidInputError
from clip_runtime.image import ImageConfig, ImagePreprocessor
from clip_runtime.text import TextTokenizer, decode_text

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], database=None)
# A small pixel cap keeps decodes of mutated headers (which may claim large sizes) fast; the code path is the same.
PRE = ImagePreprocessor(ImageConfig(max_pixels=2_000_000, max_image_bytes=1 << 20))
OUT = (224, 224, 3)


def _seed_images() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    out = []
    for image, fmt, kw in [
        (rgb, "PNG", {}),
        (rgb, "JPEG", {"quality": 80}),
        (rgb, "JPEG", {"progressive": True}),
        (rgb, "GIF", {}),
        (rgb, "BMP", {}),
        (rgb, "TIFF", {}),
        (rgb, "TIFF", {"compression": "tiff_deflate"}),
        (rgb, "WEBP", {}),
        (rgb.convert("P"), "PNG", {"transparency": 0}),
        (rgb.convert("RGBA"), "PNG", {}),
        (Image.fromarray((rng.integers(0, 65536, (20, 20))).astype(np.uint16)), "PNG", {}),
        (rgb.convert("CMYK"), "JPEG", {}),
        (rgb.convert("L"), "TIFF", {}),
        (rgb.convert("1"), "BMP", {}),
    ]:
        buf = io.BytesIO()
        image.save(buf, fmt, **kw)
        out.append(buf.getvalue())
    buf = io.BytesIO()
    np.save(buf, rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    out.append(buf.getvalue())
    return out


SEEDS = _seed_images()


def _check_image(data: bytes) -> None:
    try:
        out = PRE.load(data)
    except InvalidInputError as exc:
        assert str(exc) and "Traceback" not in str(exc)
        return
    assert out.dtype == np.uint8 and out.shape == OUT


def test_seed_images_are_valid():
    for data in SEEDS:
        assert PRE.load(data).shape == OUT


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_image(data):
    _check_image(data)


@FUZZ
@given(
    st.sampled_from(
        [
            b"\x89PNG\r\n\x1a\n",
            b"\xff\xd8\xff",
            b"GIF89a",
            b"BM",
            b"II*\x00",
            b"MM\x00*",
            b"RIFF",
            b"\x93NUMPY",
            b"\x93NUMPY\x01\x00",
        ]
    ),
    st.binary(max_size=2048),
)
def test_magic_prefixed_bytes_image(magic, rest):
    _check_image(magic + rest)


@FUZZ
@given(st.data())
def test_mutated_images(data):
    seed = bytearray(data.draw(st.sampled_from(SEEDS)))
    for _ in range(data.draw(st.integers(1, 8))):
        # bias mutations towards the header, where sizes, modes and offsets live
        pos = data.draw(st.integers(0, min(len(seed) - 1, data.draw(st.sampled_from([64, 256, len(seed) - 1])))))
        seed[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        seed = seed[: data.draw(st.integers(0, len(seed)))]
    _check_image(bytes(seed))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_json):
    return TextTokenizer(tokenizer_json, max_length=128, pad_token_id=0)


def _check_text_bytes(tok: TextTokenizer, data: bytes, max_bytes: int = 1024) -> None:
    try:
        ids, lengths, widths = tok.encode_bytes([data], max_bytes=max_bytes)
    except InvalidInputError as exc:
        assert str(exc)
        return
    assert ids.shape[0] == 1 and 2 <= ids.shape[1] <= tok.max_length
    assert lengths.tolist() == widths.tolist() == [[ids.shape[1]]]  # one text: no padding; at least BOS + EOS


@FUZZ
@given(st.binary(max_size=1500))
def test_random_bytes_text(tokenizer, data):
    _check_text_bytes(tokenizer, data)


@FUZZ
@given(st.text(max_size=400))
def test_random_strings_text(tokenizer, text):
    _check_text_bytes(tokenizer, text.encode("utf-8"))
    ids, lengths, widths = tokenizer.encode_batch([text, "x"])
    assert ids.shape[1] <= tokenizer.max_length and widths.tolist() == [[ids.shape[1]]] * 2
    assert lengths.max() == ids.shape[1] and (ids[1, lengths[1, 0] :] == tokenizer.pad_token_id).all()


@FUZZ
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF, blacklist_categories=()), max_size=50))
def test_strings_with_surrogates_are_typed_errors(text):
    try:
        assert decode_text(text, 1024) == text
    except InvalidInputError:
        pass


def test_text_limits_and_empty(tokenizer):
    rows = tokenizer.encode_bytes([b""])  # empty text is valid: BOS, EOS (as the HF tokenizer)
    assert rows.lengths.tolist() == [[2]]
    with pytest.raises(InvalidInputError, match="more than the limit of 10"):
        decode_text(b"x" * 11, 10)
    with pytest.raises(InvalidInputError, match="lone surrogate"):
        decode_text("a\ud800b")
