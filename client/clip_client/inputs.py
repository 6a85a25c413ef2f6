"""Turn user inputs (texts, image paths, bytes, PIL images, uint8 arrays) into the BYTES items the ensembles take."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from .errors import InvalidInputError

NPY_MAGIC = b"\x93NUMPY"
# PIL modes that PNG stores losslessly; the server converts them to RGB the same way it would for a file.
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"}

ImageLike = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, Any]  # Any: PIL.Image.Image


def normalize_texts(texts: str | Iterable[str]) -> list[str]:
    """A str or an iterable of str -> list[str]; anything else is an InvalidInputError."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)) or texts is None:
        raise InvalidInputError(f"texts must be a str or a list of str, got {type(texts).__name__}")
    try:
        items = list(texts)
    except TypeError:
        raise InvalidInputError(f"texts must be a str or a list of str, got {type(texts).__name__}") from None
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise InvalidInputError(f"texts[{i}] must be a str, got {type(t).__name__}")
    return items


def encode_texts(texts: Sequence[str]) -> list[bytes]:
    """UTF-8 encode each text."""
    return [t.encode("utf-8") for t in texts]


def _is_pil(x: Any) -> bool:
    """True for a PIL image, without importing PIL when the caller never used it."""
    return type(x).__module__.startswith("PIL.") and hasattr(x, "mode") and hasattr(x, "save")


def npy_bytes(array: np.ndarray) -> bytes:
    """A uint8 (H, W, 3) array serialised with numpy.save (the contract's raw-pixel form)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _check_pixels(array: np.ndarray, where: str) -> None:
    if array.dtype != np.uint8:
        raise InvalidInputError(f"{where}: image arrays must be uint8, got {array.dtype}")
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidInputError(f"{where}: an image array must be shaped (H, W, 3), got {array.shape}")


def pil_bytes(image: Any) -> bytes:
    """A PIL image -> bytes: RGB as .npy (exact, no codec), other PNG-able modes as PNG, the rest converted to RGB."""
    if image.mode == "RGB":
        return npy_bytes(np.asarray(image, dtype=np.uint8))
    if image.mode in _PNG_MODES:
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=1)  # lossless at any level; 1 is the fastest
        return buf.getvalue()
    return npy_bytes(np.asarray(image.convert("RGB"), dtype=np.uint8))


def image_item_bytes(item: Any, where: str = "image") -> bytes:
    """One image (path, encoded bytes, PIL image or uint8 (H, W, 3) array) -> the bytes sent to the server."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
        if not data:
            raise InvalidInputError(f"{where}: empty bytes")
        return data
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise InvalidInputError(f"{where}: cannot read {str(path)!r}: {e.strerror or e}") from None
        if not data:
            raise InvalidInputError(f"{where}: {str(path)!r} is empty")
        return data
    if isinstance(item, np.ndarray):
        _check_pixels(item, where)
        return npy_bytes(item)
    if _is_pil(item):
        return pil_bytes(item)
    raise InvalidInputError(
        f"{where}: expected a file path, encoded bytes, a PIL image or a uint8 (H, W, 3) array, got {type(item).__name__}"
    )


def normalize_images(images: Any) -> list[Any]:
    """One image or a batch (list/tuple, or a uint8 (N, H, W, 3) array) -> a list of single images."""
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            return list(images)
        return [images]
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview)) or _is_pil(images):
        return [images]
    if isinstance(images, (list, tuple)):
        return list(images)
    raise InvalidInputError(
        f"images must be an image or a list of images (path, bytes, PIL image, uint8 array), got {type(images).__name__}"
    )


def encode_images(images: Any) -> list[bytes]:
    """Normalize then serialise images (see image_item_bytes)."""
    items = normalize_images(images)
    return [image_item_bytes(x, f"images[{i}]") for i, x in enumerate(items)]


def chunk_spans(sizes: Sequence[int], max_items: int, max_bytes: int | None = None) -> list[tuple[int, int]]:
    """Split items (their byte sizes) into consecutive [start, end) spans of <= max_items and <= max_bytes.

    An item larger than max_bytes travels alone. Order is kept, every item is in exactly one span.
    """
    if max_items < 1:
        raise ValueError(f"max_items must be >= 1, got {max_items}")
    spans: list[tuple[int, int]] = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        full = i - start >= max_items or (max_bytes is not None and i > start and total + size > max_bytes)
        if full:
            spans.append((start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        spans.append((start, len(sizes)))
    return spans
