"""resize_region: the kept rectangle of Pillow's resize, bit for bit, with memory bounded by the rectangle."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import PIL
import pytest
from PIL import Image

from clip_runtime import image as image_module
from clip_runtime.errors import InvalidInputError
from clip_runtime.image import ImageConfig, ImagePreprocessor
from clip_runtime.resample import FILTERS, horizontal_first, resize_region


def _array(h: int, w: int, seed: int) -> np.ndarray:
    """Noise with a hard edge and a gradient (edges exercise the negative lobes and the clipping)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    a[: h // 2, : w // 3] = np.linspace(0, 255, max(1, w // 3), dtype=np.uint8)[None, :, None]
    a[h // 3 : h // 2] = 255
    return a


def _sizes(n: int, seed: int):
    """(w, h, new_w, new_h): up- and downscales, thin images, both pass orders, unchanged sides."""
    rng = np.random.default_rng(seed)
    yield from [
        (1, 1, 224, 224),
        (224, 900, 224, 300),
        (900, 224, 300, 224),
        (5, 700, 50, 7000),
        (700, 5, 7000, 50),
        (293, 1414, 224, 1080),
        (1414, 293, 1080, 224),
        (100, 400, 400, 100),
        (400, 100, 100, 400),
    ]
    for _ in range(n):
        w, h = (int(v) for v in rng.integers(1, 700, 2))
        nw, nh = (int(v) for v in rng.integers(1, 700, 2))
        yield w, h, nw, nh


@pytest.mark.parametrize("resample", sorted(FILTERS))
def test_region_equals_pillow_resize_then_crop(resample):
    rng = np.random.default_rng(resample)
    orders = set()
    for i, (w, h, nw, nh) in enumerate(_sizes(15, resample)):
        array = _array(h, w, i)
        full = np.asarray(Image.fromarray(array).resize((nw, nh), resample=resample))
        left, top = (int(rng.integers(0, nw)), int(rng.integers(0, nh))) if i % 2 else (0, 0)
        right, bottom = (int(rng.integers(left + 1, nw + 1)), int(rng.integers(top + 1, nh + 1))) if i % 2 else (nw, nh)
        ours = resize_region(array, (nw, nh), (left, top, right, bottom), resample)
        assert np.array_equal(ours, full[top:bottom, left:right]), (resample, w, h, nw, nh, (left, top, right, bottom))
        orders.add(horizontal_first(w, h, nw, nh))
    # Pillow 13 (the pinned one) runs both pass orders over these sizes; earlier Pillows only the horizontal-first one
    assert orders == ({True, False} if int(PIL.__version__.split(".")[0]) >= 13 else {True})


def test_region_memory_follows_the_region_not_the_resized_image():
    """1 x 10000 at a 224 shortest edge: Pillow would allocate 224 x 2,240,000 pixels (about 2 GB)."""
    array = _array(10000, 1, 0)
    tracemalloc.start()
    out = resize_region(array, (224, 2_240_000), (0, 1_119_888, 224, 1_120_112), 3)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.shape == (224, 224, 3)
    assert peak < 20 * 2**20, peak


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "cfg",
    [ImageConfig(), ImageConfig(image_size=64, crop_size=64, resize_mode="exact", do_center_crop=False)],
    ids=["crop", "exact"],
)
def test_bounded_path_gives_the_same_pixels_as_pillow(monkeypatch, cfg):
    """The preprocessor's two ways (Pillow's whole resize, the region) agree on ordinary and thin images."""
    images = [_png(_array(h, w, h + w)) for h, w in [(300, 400), (1000, 333), (3, 900), (900, 3), (97, 130)]]
    pre = ImagePreprocessor(cfg)
    whole = [pre.load(b) for b in images]
    monkeypatch.setattr(image_module, "FULL_RESIZE_MAX_PIXELS", 0)
    for data, expected in zip(images, whole):
        assert np.array_equal(pre.load(data), expected)


def test_thin_images_are_answered_with_bounded_memory():
    """1 x 10000 and 10000 x 1 (the issue's attack): a 224 x 224 crop, computed from the rows the crop keeps."""
    pre = ImagePreprocessor()
    for shape in [(10000, 1, 3), (1, 10000, 3)]:
        data = _png(_array(*shape[:2], 1))
        tracemalloc.start()
        out = pre.load(data)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert out.shape == (224, 224, 3) and peak < 20 * 2**20, (shape, peak)


def test_aspect_ratio_limit_is_checked_before_decoding():
    pre = ImagePreprocessor(ImageConfig(max_aspect_ratio=100))
    assert pre.load(_png(_array(5, 500, 0))).shape == (224, 224, 3)  # exactly 100:1
    for shape in [(5, 501), (501, 5)]:
        with pytest.raises(
            InvalidInputError, match=r"image is \d+x\d+: its aspect ratio is more than the limit of 100:1"
        ):
            pre.load(_png(_array(*shape, 0)))
    npy = io.BytesIO()
    np.save(npy, _array(1, 101, 0))
    with pytest.raises(InvalidInputError, match="aspect ratio"):
        pre.load(npy.getvalue())


def test_nearest_is_refused_at_configuration():
    with pytest.raises(ValueError, match="resample 0"):
        ImagePreprocessor(ImageConfig(resample=0))
