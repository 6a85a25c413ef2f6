"""Handing freed heap memory back to the OS after a bulk-sized batch (glibc keeps it for reuse otherwise)."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

# After a batch of more rows than this, the freed buffers go back to the OS: one batch of 64 images kept the image
# encoder hundreds of MB larger for good, and the image preprocessor's decode threads tens of MB.
TRIM_ROWS = 16


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
