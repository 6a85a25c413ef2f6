"""Turn user inputs (texts, image paths and URLs, bytes, PIL images, uint8 arrays) into the BYTES items the ensembles
take."""

from __future__ import annotations

import io
import itertools
import os
import re
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InvalidInputError

NPY_MAGIC = b"\x93NUMPY"
DEFAULT_DOWNLOAD_BYTES = 20 * 1024 * 1024  # the server's default max_image_bytes
DEFAULT_DOWNLOAD_TIMEOUT = 30.0  # seconds per image URL, in all
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# PIL modes that PNG stores losslessly; the server converts them to RGB the same way it would for a file.
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"}


def is_single_text(texts: Any) -> bool:
    """True when `texts` is one text (a str), not a collection of them."""
    return isinstance(texts, str)


def iter_texts(texts: str | Iterable[str]) -> Iterator[str]:
    """A str or any iterable of str -> the texts one by one (lazily); anything else is an InvalidInputError."""
    if isinstance(texts, str):
        yield _utf8_safe(texts, "text")
        return
    if isinstance(texts, (bytes, bytearray)) or texts is None or not isinstance(texts, Iterable):
        raise InvalidInputError(f"texts must be a str or an iterable of str, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InvalidInputError(f"texts[{i}] must be a str, got {type(t).__name__}")
        yield _utf8_safe(t, f"texts[{i}]")


def _utf8_safe(text: str, where: str) -> str:
    """text itself when it can be sent as UTF-8; a lone surrogate (or any unencodable code point) is an
    InvalidInputError naming where it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInputError(
            f"{where}: not valid Unicode text: {e.reason} at position {e.start} ({text[e.start : e.end]!a})"
        ) from None
    return text


def normalize_texts(texts: str | Iterable[str]) -> list[str]:
    """A str or an iterable of str -> list[str] (see iter_texts)."""
    return list(iter_texts(texts))


def encode_texts(texts: str | Iterable[str]) -> Iterator[bytes]:
    """Texts (see iter_texts) -> each one UTF-8 encoded, lazily."""
    for t in iter_texts(texts):
        yield t.encode("utf-8")


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


def image_item_bytes(
    item: Any,
    where: str = "image",
    max_download_bytes: int = DEFAULT_DOWNLOAD_BYTES,
    download_timeout: float = DEFAULT_DOWNLOAD_TIMEOUT,
) -> bytes:
    """One image (path, http(s) URL, encoded bytes, PIL image or uint8 (H, W, 3) array) -> the bytes to send."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
        if not data:
            raise InvalidInputError(f"{where}: empty bytes")
        return data
    if isinstance(item, str) and _URL.match(item):
        scheme = item.split(":", 1)[0].lower()
        if scheme not in ("http", "https"):
            raise InvalidInputError(f"{where}: cannot read {item!r}: only http:// and https:// URLs are fetched")
        return fetch_url(item, where, max_download_bytes, download_timeout)
    if isinstance(item, (str, os.PathLike)):
        try:
            data = Path(item).read_bytes()
        except OSError as e:
            raise InvalidInputError(f"{where}: cannot read {os.fspath(item)!r}: {e.strerror or e}") from None
        if not data:
            raise InvalidInputError(f"{where}: {os.fspath(item)!r} is empty")
        return data
    if isinstance(item, np.ndarray):
        _check_pixels(item, where)
        return npy_bytes(item)
    if _is_pil(item):
        return pil_bytes(item)
    raise InvalidInputError(
        f"{where}: expected a file path, an http(s) URL, encoded bytes, a PIL image or a uint8 (H, W, 3) array, "
        f"got {type(item).__name__}"
    )


class _Deadline:
    """A fetch's total deadline: at `seconds`, every connection it opened is shut down, whatever it waits for (a
    server that drips its headers or body byte by byte never outlasts it)."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.expired = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._timer.cancel()

    def _expire(self) -> None:
        with self._lock:
            self.expired.set()
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)

    def _watch(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired.is_set()
        if expired:
            _shut(sock)
        return sock

    def connection(self, cls: type) -> Any:
        """A factory for urllib's do_open: `cls` connections whose operations time out with the deadline and whose
        socket (the plain one, under any TLS) it shuts down."""

        def make(host: str, **kw: Any) -> Any:
            kw["timeout"] = max(0.001, self.end - time.monotonic())
            conn = cls(host, **kw)
            conn._create_connection = lambda *a, **k: self._watch(socket.create_connection(*a, **k))
            return conn

        return make


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


def _opener(deadline: _Deadline) -> Any:
    """An opener for HTTP(S) only (no file://, ftp:// or data: handlers, so a redirect cannot reach anything else),
    every connection under `deadline`."""
    import http.client
    import ssl
    import urllib.request

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(deadline.connection(http.client.HTTPConnection), req)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(deadline.connection(http.client.HTTPSConnection), req, context=self._context)

    opener = urllib.request.OpenerDirector()
    for handler in (
        HTTP(),
        HTTPS(context=ssl.create_default_context()),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def quote_url(url: str) -> str:
    """The URL with what must be percent-encoded encoded (spaces, non-ASCII), what already is left as it is."""
    from urllib.parse import quote

    return quote(url, safe=":/?#[]@!$&'()*+,;=%~")


def fetch_url(url: str, where: str, max_bytes: int, timeout: float) -> bytes:
    """GET an http(s) URL: at most max_bytes, within `timeout` seconds in all (connecting, redirects, headers and
    body together); failures are InvalidInputErrors."""
    import http.client
    import urllib.error
    import urllib.request

    request = urllib.request.Request(quote_url(url), headers={"User-Agent": "clip-triton-client"})
    timed_out = InvalidInputError(f"{where}: cannot fetch {url}: timed out after {timeout:g} s")
    chunks, size = [], 0
    with _Deadline(timeout) as deadline:
        try:
            with _opener(deadline).open(request) as response:
                declared = response.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise InvalidInputError(f"{where}: {url} is {declared} bytes, more than the limit of {max_bytes}")
                while chunk := response.read(1 << 16):
                    size += len(chunk)
                    if size > max_bytes:
                        raise InvalidInputError(f"{where}: {url} is more than the limit of {max_bytes} bytes")
                    chunks.append(chunk)
        except InvalidInputError:
            raise
        except (OSError, http.client.HTTPException, ValueError) as e:  # URLError, HTTPError, timeouts, resets
            if deadline.expired.is_set():
                raise timed_out from None
            if isinstance(e, urllib.error.HTTPError):
                raise InvalidInputError(f"{where}: cannot fetch {url}: HTTP {e.code} {e.reason}") from None
            if isinstance(e, urllib.error.URLError):
                raise InvalidInputError(f"{where}: cannot fetch {url}: {e.reason}") from None
            raise InvalidInputError(f"{where}: cannot fetch {url}: {e or type(e).__name__}") from None
        if deadline.expired.is_set():  # a read cut short by the deadline can end like a complete one
            raise timed_out
    if not size:
        raise InvalidInputError(f"{where}: {url} answered no bytes")
    return b"".join(chunks)


def is_single_image(images: Any) -> bool:
    """True when `images` is one image (path, URL, bytes, PIL image, (H, W, 3) array), not a collection."""
    if isinstance(images, np.ndarray):
        return images.ndim != 4
    return isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview)) or _is_pil(images)


def iter_images(images: Any) -> Iterator[Any]:
    """One image, or any iterable of images (list, generator, uint8 (N, H, W, 3) array) -> the images one by one."""
    if is_single_image(images):
        yield images
        return
    if images is None or not isinstance(images, Iterable) or isinstance(images, dict):
        raise InvalidInputError(
            "images must be an image or an iterable of images (path, URL, bytes, PIL image, uint8 array), "
            f"got {type(images).__name__}"
        )
    yield from images


def encode_images(images: Any, **download: Any) -> Iterator[bytes]:
    """Images -> their bytes (see image_item_bytes), lazily; download: max_download_bytes, download_timeout."""
    for i, x in enumerate(iter_images(images)):
        yield image_item_bytes(x, f"images[{i}]", **download)


def by_length(items: Iterable[bytes], window: int, order: list[int]) -> Iterator[bytes]:
    """`items` re-ordered shortest first within consecutive windows of `window` items, read lazily; the input index
    of each item yielded is appended to `order`. Texts of similar length in one request: the encoder pads each batch
    to its longest text, so mixed lengths cost the padding."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    it = iter(items)
    start = 0
    while chunk := list(itertools.islice(it, window)):
        idx = sorted(range(len(chunk)), key=lambda i: len(chunk[i]))  # stable: equal lengths keep their order
        order.extend(start + i for i in idx)
        yield from (chunk[i] for i in idx)
        start += len(chunk)


def iter_batches(items: Iterable[bytes], max_items: int, max_bytes: int | None = None) -> Iterator[list[bytes]]:
    """Consecutive batches of <= max_items items and <= max_bytes bytes, read lazily from `items`.

    An item larger than max_bytes travels alone. Order is kept, every item is in exactly one batch.
    """
    if max_items < 1:
        raise ValueError(f"max_items must be >= 1, got {max_items}")
    batch: list[bytes] = []
    total = 0
    for item in items:
        if batch and (len(batch) >= max_items or (max_bytes is not None and total + len(item) > max_bytes)):
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += len(item)
    if batch:
        yield batch
