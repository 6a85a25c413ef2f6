"""clip_runtime.image without a reference: .npy inputs, limits checked before decoding, bad bytes, formats, the
batch path and the parameters it reads (pixel parity with transformers: tests/parity/test_image_preprocess.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from clip_runtime.errors import InvalidInputError
from clip_runtime.image import ImageConfig, ImagePreprocessor
from clip_runtime.params import read_parameters
from tests.images import encode, photo


def test_batch_normalise_equals_single_items():
    pre = ImagePreprocessor()
    items = [
        encode(Image.fromarray(photo(h, w, s)), "PNG") for s, (h, w) in enumerate([(300, 200), (224, 500), (64, 64)])
    ]
    batch = pre(items)
    assert batch.shape == (3, 3, 224, 224)
    for i, data in enumerate(items):
        assert np.array_equal(batch[i], pre([data])[0])


def test_npy_input_matches_png():
    rgb = photo(150, 260)
    buf = io.BytesIO()
    np.save(buf, rgb)
    pre = ImagePreprocessor()
    assert np.array_equal(pre([buf.getvalue()])[0], pre([encode(Image.fromarray(rgb), "PNG")])[0])


@pytest.mark.parametrize(
    "array,match",
    [
        (np.zeros((10, 10, 3), np.float32), "uint8"),
        (np.zeros((10, 10), np.uint8), r"\(H, W, 3\)"),
        (np.zeros((10, 10, 4), np.uint8), r"\(H, W, 3\)"),
        (np.zeros((0, 10, 3), np.uint8), "empty"),
        (np.array([{"a": 1}], dtype=object), "uint8"),
    ],
)
def test_npy_rejected(array, match):
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    with pytest.raises(InvalidInputError, match=match):
        ImagePreprocessor().load(buf.getvalue())


def test_npy_pixel_limit_checked_from_header():
    buf = io.BytesIO()
    np.save(buf, np.zeros((100, 100, 3), np.uint8))
    with pytest.raises(InvalidInputError, match="pixels"):
        ImagePreprocessor(ImageConfig(max_pixels=5000)).load(buf.getvalue())


def test_decompression_bomb_refused_before_decode():
    data = encode(Image.new("L", (6000, 6000)), "PNG")  # tiny file, 36 Mpx
    pre = ImagePreprocessor(ImageConfig(max_pixels=10_000_000))
    with pytest.raises(InvalidInputError, match="pixels"):
        pre.load(data)


@pytest.mark.parametrize(
    "data,match",
    [
        (b"", "empty"),
        (b"definitely not an image", "not a decodable image"),
        (encode(Image.new("RGB", (50, 50)), "PNG")[:60], "decode|header|truncated|not a decodable"),
        (encode(Image.new("RGB", (64, 64)), "JPEG")[:300], "decode|truncated|Truncated"),
    ],
)
def test_bad_bytes_raise_invalid_input(data, match):
    with pytest.raises(InvalidInputError, match=match):
        ImagePreprocessor().load(data)


def test_allowed_formats_restrict_decoders():
    pre = ImagePreprocessor(ImageConfig(allowed_formats=("PNG",)))
    pre.load(encode(Image.new("RGB", (40, 40)), "PNG"))
    with pytest.raises(InvalidInputError, match="allowed formats: PNG"):
        pre.load(encode(Image.new("RGB", (40, 40)), "JPEG"))


def test_max_image_bytes():
    with pytest.raises(InvalidInputError, match="bytes"):
        ImagePreprocessor(ImageConfig(max_image_bytes=100)).load(encode(Image.fromarray(photo(64, 64)), "PNG"))


def test_load_many_returns_errors_in_place():
    from concurrent.futures import ThreadPoolExecutor

    good = encode(Image.fromarray(photo(50, 70)), "PNG")
    with ThreadPoolExecutor(2) as pool:
        out = ImagePreprocessor().load_many([good, b"junk", good], pool)
    assert isinstance(out[1], InvalidInputError)
    assert np.array_equal(out[0], out[2]) and out[0].shape == (224, 224, 3)


def test_parameters_roundtrip_into_config():
    config = {
        "parameters": {
            "image_size": {"string_value": "336"},
            "image_mean": {"string_value": "0.5,0.5,0.5"},
            "do_center_crop": {"string_value": "false"},
            "allowed_formats": {"string_value": "PNG, JPEG"},
        }
    }
    p = read_parameters(
        config,
        [
            "image_size",
            "crop_size",
            "image_mean",
            "do_center_crop",
            "allowed_formats",
            "image_std",
            "resize_mode",
            "resample",
            "rescale_factor",
            "max_image_bytes",
            "max_pixels",
            "jpeg_draft_gap",
        ],
    )
    cfg = ImageConfig.from_parameters(p)
    assert cfg.image_size == 336 and cfg.crop_size == 224 and cfg.mean == (0.5, 0.5, 0.5)
    assert cfg.do_center_crop is False and cfg.allowed_formats == ("PNG", "JPEG") and cfg.output_size == 336
