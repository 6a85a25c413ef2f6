"""Test images shared by the unit and parity levels."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients, an edge and noise: (h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack(
        [128 + 100 * np.sin(7 * x + 3 * y), 128 + 90 * np.cos(15 * x * y), 128 + 80 * np.sin(11 * x * y + 2)], -1
    )
    img += rng.normal(0, 12, (h, w, 3))
    img[h // 3 : h // 2, w // 4 : w // 2] = (250, 20, 20)
    return img.clip(0, 255).astype(np.uint8)
