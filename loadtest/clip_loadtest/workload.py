"""The workload every load tool shares (bench, perf_analyzer inputs, the locustfile, soak): photo-like JPEGs of
several sizes and short prompts, deterministic for a seed. Import-light: numpy and Pillow only, imported lazily."""

from __future__ import annotations

import io
from collections.abc import Sequence

LABELS = ["cat", "dog", "car", "airplane", "bird", "ship", "horse", "truck", "frog", "deer"]
_TEMPLATES = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a {} in the wild",
    "a close-up photo of the {}.",
    "a drawing of a {}",
    "two {}s next to each other",
]
DEFAULT_IMAGE_SIZES: tuple[tuple[int, int], ...] = ((224, 224), (320, 240), (480, 640), (640, 480), (1024, 768))


def short_prompts(n: int) -> list[str]:
    """n short prompts (5-8 words, ~8-12 tokens), deterministic."""
    out = []
    for i in range(n):
        out.append(_TEMPLATES[i % len(_TEMPLATES)].format(LABELS[(i // len(_TEMPLATES) + i) % len(LABELS)]))
    return out


def parse_sizes(spec: str | Sequence) -> list[tuple[int, int]]:
    """'224,640x480' or [224, (640, 480)] -> [(224, 224), (640, 480)] as (width, height)."""
    items = spec.replace(" ", "").split(",") if isinstance(spec, str) else list(spec)
    sizes = []
    for item in items:
        if isinstance(item, (tuple, list)):
            w, h = item
        elif isinstance(item, int):
            w = h = item
        elif "x" in item:
            w, h = item.lower().split("x", 1)
        elif item:
            w = h = item
        else:
            continue
        w, h = int(w), int(h)
        if not (8 <= w <= 8192 and 8 <= h <= 8192):
            raise ValueError(f"image size {w}x{h} out of range 8..8192")
        sizes.append((w, h))
    if not sizes:
        raise ValueError(f"no image sizes in {spec!r}")
    return sizes


def synthetic_image(width: int, height: int, seed: int):
    """A photo-like RGB PIL image: smooth colour gradients, a few shapes and mild noise (compresses like a photo)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    chans = []
    for _ in range(3):
        a, b, c = rng.uniform(-1, 1, 3)
        f = rng.uniform(1, 4)
        chans.append(127 + 80 * np.sin(f * (a * xx / width + b * yy / height) * np.pi + c * 3))
    arr = np.stack(chans, axis=-1) + rng.normal(0, 6, (height, width, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(8, max(9, width // 2))), y0 + int(rng.integers(8, max(9, height // 2)))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    return img


def jpeg_images(n: int, sizes: str | Sequence = DEFAULT_IMAGE_SIZES, seed: int = 0, quality: int = 90) -> list[bytes]:
    """n JPEG files (bytes) cycling through `sizes` (width x height), deterministic for a seed."""
    out = []
    for i, (w, h) in enumerate(parse_sizes(sizes) * (n // max(1, len(parse_sizes(sizes))) + 1)):
        if i >= n:
            break
        buf = io.BytesIO()
        synthetic_image(w, h, seed * 100_003 + i).save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out
