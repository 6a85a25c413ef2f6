"""Pillow's convolution resize (Resample.c), bit for bit, for one rectangle of the output only.

`Image.resize(size)` allocates the whole resized image: for a 1 x 10000 picture and a 224 shortest edge that is
224 x 2,240,000 pixels (GBs) of which the center crop keeps 224 x 224. `resize_region` computes just the kept
rectangle with Pillow's own arithmetic (double coefficients, 22-bit fixed point, horizontal pass then vertical
pass, uint8 in between), so its pixels equal `image.resize(size)` cropped, while memory and time follow the
rectangle and the source rows it reads. numpy only (never torch).
"""

from __future__ import annotations

import math

import numpy as np
import PIL

PRECISION_BITS = 32 - 8 - 2  # Resample.c: 8 bits for the result, 2 for overflow
_CHUNK_VALUES = 1 << 21  # float64 values gathered per step of a horizontal pass (16 MiB)
_PILLOW_MAJOR = int(PIL.__version__.split(".")[0])


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _box(x: np.ndarray) -> np.ndarray:
    return np.where((x > -0.5) & (x <= 0.5), 1.0, 0.0)


def _sinc(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(x == 0.0, 1.0, np.sin(x * math.pi) / (x * math.pi))


def _hamming(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    px = x * math.pi
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.sin(px) / px * (float(np.float32(0.54)) + float(np.float32(0.46)) * np.cos(px))
    return np.where(x == 0.0, 1.0, np.where(x >= 1.0, 0.0, w))


def _lanczos(x: np.ndarray) -> np.ndarray:
    return np.where((x >= -3.0) & (x < 3.0), _sinc(x) * _sinc(x / 3), 0.0)


# PIL.Image.Resampling value -> (filter, support). NEAREST (0) is not a convolution in Pillow: not here.
# Bicubic, bilinear and box are rational and bit-identical to Pillow; hamming and lanczos go through numpy's sin/cos,
# which may differ from the C library's in the last bit (a pixel off by one level, rarely).
FILTERS = {3: (_bicubic, 2.0), 2: (_bilinear, 1.0), 4: (_box, 0.5), 5: (_hamming, 1.0), 1: (_lanczos, 3.0)}


def coefficients(in_size: int, out_size: int, lo: int, hi: int, resample: int) -> tuple[np.ndarray, np.ndarray]:
    """precompute_coeffs + normalize_coeffs_8bpc for output positions [lo, hi) of an in_size -> out_size pass.

    Returns (first source index (n,), fixed-point weights int64 (n, ksize)); weights past a window are 0.
    """
    filt, filter_support = FILTERS[resample]
    scale = float(np.float32(in_size)) / out_size  # (double)(in1 - in0) / outSize, the box being float32
    filterscale = max(scale, 1.0)
    support = filter_support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(lo, hi, dtype=np.float64) + 0.5) * scale  # (n,)
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)  # (int) truncates, as in C
    count = np.minimum((center + support + 0.5).astype(np.int64), in_size) - first  # (n,)
    taps = np.arange(ksize)  # (ksize,)
    w = filt(((first[:, None] + taps[None, :]) - center[:, None] + 0.5) * (1.0 / filterscale))  # (n, ksize)
    w = np.where(taps[None, :] < count[:, None], w, 0.0)
    total = np.zeros(len(center))
    for t in range(ksize):  # left to right, as C sums them (numpy's pairwise sum may round differently)
        total = total + w[:, t]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    scaled = w * (1 << PRECISION_BITS)
    return first, np.trunc(np.where(w < 0, -0.5 + scaled, 0.5 + scaled)).astype(np.int64)


def _pass(array: np.ndarray, axis: int, first: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One resampling pass along axis 0 (vertical) or 1 (horizontal) of uint8 (H, W, C), output position by position.

    Integer sums in float64 are exact (every partial sum stays far below 2**53), so the order of the dot product does
    not matter: the result equals Pillow's int32 loop.
    """
    shape = list(array.shape)
    shape[axis] = len(first)
    out = np.empty(shape, dtype=np.uint8)
    size = array.shape[axis]
    half = float(1 << (PRECISION_BITS - 1))
    rows = max(1, _CHUNK_VALUES // max(1, weights.shape[1] * array.shape[2]))  # horizontal: source rows per step
    for j in range(len(first)):
        lo = int(first[j])
        k = weights[j, : min(weights.shape[1], size - lo)].astype(np.float64)  # (taps,)
        if axis == 0:
            block = array[lo : lo + len(k)].reshape(len(k), -1).astype(np.float64)  # (taps, W*C)
            acc = half + k @ block  # (W*C,)
            out[j] = np.clip(np.floor(acc / (1 << PRECISION_BITS)), 0, 255).reshape(shape[1:])
        else:
            for r in range(0, array.shape[0], rows):
                block = array[r : r + rows, lo : lo + len(k)].astype(np.float64)  # (rows, taps, C)
                acc = half + np.einsum("rtc,t->rc", block, k)  # (rows, C)
                out[r : r + rows, j] = np.clip(np.floor(acc / (1 << PRECISION_BITS)), 0, 255)
    return out


def _used(first: np.ndarray, weights: np.ndarray, size: int) -> slice:
    """The source positions a pass reads (a superset: weights past a window are 0)."""
    return slice(int(first[0]), min(size, int(first[-1]) + weights.shape[1]))


def horizontal_first(width: int, height: int, new_w: int, new_h: int) -> bool:
    """The pass order of the installed Pillow: 13 runs the vertical pass first when the height shrinks by more than
    twice as many pixels as the width; earlier versions always start with the horizontal pass."""
    if _PILLOW_MAJOR < 13:
        return True
    dy, dx = height - new_h, width - new_w
    return not (dy > 0 and dy > dx * 2)


def resize_region(
    array: np.ndarray, size: tuple[int, int], box: tuple[int, int, int, int], resample: int
) -> np.ndarray:
    """uint8 (H, W, C) -> uint8 (bottom - top, right - left, C): rows [top, bottom) and columns [left, right) of
    `Image.fromarray(array).resize(size, resample)` (size = (width, height)), computed alone."""
    height, width = array.shape[:2]
    new_w, new_h = size
    left, top, right, bottom = box
    rows_first, rows_weights = coefficients(height, new_h, top, bottom, resample)
    cols_first, cols_weights = coefficients(width, new_w, left, right, resample)
    # Pillow skips a pass whose size does not change (it would be the identity); so do we.
    if horizontal_first(width, height, new_w, new_h):
        rows = _used(rows_first, rows_weights, height)
        part = _pass(array[rows], 1, cols_first, cols_weights) if new_w != width else array[rows, left:right]
        if new_h == height:
            return part[top - rows.start : bottom - rows.start]
        return _pass(part, 0, rows_first - rows.start, rows_weights)
    cols = _used(cols_first, cols_weights, width)
    part = _pass(array[:, cols], 0, rows_first, rows_weights) if new_h != height else array[top:bottom, cols]
    if new_w == width:
        return part[:, left - cols.start : right - cols.start]
    return _pass(part, 1, cols_first - cols.start, cols_weights)
