"""The `Gallery` API shared by every backend: rows, hits, identity checks, URI dispatch, search by text or image.

A row is one image file: path, sha256, size (bytes), width, height, mtime (seconds), tags (list of str), user
metadata (a JSON object) and its L2-normalised embedding. Scores are cosine similarities. The identity of the model
that embedded the rows (model_id, dim, logit_scale) is stored with the gallery; searching or extending it with
another model raises ModelMismatchError.
"""

from __future__ import annotations

import json
import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import ops
from ..errors import CLIPClientError, InvalidInputError, ModelMismatchError

FORMAT_VERSION = 2
# Columns a filter may name (Milvus boolean-expression syntax, see filters.py); `meta["key"]` reads user metadata.
FIELDS = ("path", "sha256", "size", "width", "height", "mtime", "tags", "meta")
RESERVED = frozenset(FIELDS) - {"meta"}  # metadata keys stored in their own columns
MAX_PATH = 4096  # bytes; Milvus VARCHAR needs a bound
MAX_TAGS, MAX_TAG = 64, 256
_UNKNOWN_INT = -1  # stored for an unknown size / width / height / mtime; read back as None (`size >= 0`: known)
_INT64_MAX = 2**63 - 1


class MissingExtraError(CLIPClientError):
    """An optional dependency of the client is not installed."""


class GalleryError(CLIPClientError):
    """The gallery's storage failed: a folder that cannot be created or written, a Milvus error."""


def require(module: str, extra: str, what: str) -> Any:
    """import `module`, or raise MissingExtraError naming the client extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # the real reason too: a package that is there but fails to import says why
        raise MissingExtraError(
            f"{what} needs {module.split('.')[0]}: pip install 'clip-triton-client[{extra}]' "
            f"(the full clip-triton install has it) ({type(e).__name__}: {e})"
        ) from None


@dataclass(frozen=True)
class Hit:
    """One search result: the row and its cosine similarity to the query."""

    path: str
    score: float
    id: int
    sha256: str | None = None
    size: int | None = None
    width: int | None = None
    height: int | None = None
    mtime: float | None = None
    tags: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-able dict of the hit."""
        return {
            "path": self.path,
            "score": self.score,
            "sha256": self.sha256,
            "size": self.size,
            "width": self.width,
            "height": self.height,
            "mtime": self.mtime,
            "tags": list(self.tags),
            "metadata": dict(self.metadata),
        }


def check_path(path: Any) -> None:
    """A stored path: a non-empty str of at most MAX_PATH bytes in UTF-8 (InvalidInputError otherwise)."""
    if not isinstance(path, str) or not path:
        raise InvalidInputError(f"a path must be a non-empty str, got {path!r}")
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInputError(f"path is not valid Unicode (a lone surrogate): {path!r}") from None
    if size > MAX_PATH:
        raise InvalidInputError(f"path is longer than {MAX_PATH} bytes: {path[:80]}...")


def as_paths(paths: str | os.PathLike | Sequence[str] | None) -> list[str] | None:
    """A single path (str / os.PathLike) as [path]; a sequence of them as a list; None stays None."""
    if paths is None:
        return None
    if isinstance(paths, (str, os.PathLike)):
        return [os.fspath(paths)]
    if isinstance(paths, (bytes, bytearray)):
        raise InvalidInputError("paths must be str, not bytes")
    return [os.fspath(p) if isinstance(p, os.PathLike) else p for p in paths]


def row_values(path: str, metadata: dict | None) -> dict:
    """One row's stored columns from a path and its metadata dict (reserved keys -> columns, the rest -> meta)."""
    check_path(path)
    meta = dict(metadata or {})
    if not isinstance(metadata or {}, dict):
        raise InvalidInputError(f"metadata must be a dict per row, got {type(metadata).__name__}")
    tags = meta.pop("tags", None) or []
    if (
        isinstance(tags, str)
        or len(tags) > MAX_TAGS
        or not all(isinstance(t, str) and 0 < len(t.encode("utf-8")) <= MAX_TAG for t in tags)
    ):
        raise InvalidInputError(
            f"tags must be a list of at most {MAX_TAGS} non-empty str of <= {MAX_TAG} bytes, got {tags!r}"
        )
    sha = meta.pop("sha256", None) or ""
    if not isinstance(sha, str) or (sha and not re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise InvalidInputError(f"sha256 must be 64 lowercase hex digits, got {sha!r}")
    row = {"path": path, "sha256": sha, "tags": list(tags)}
    for key, kind in (("size", int), ("width", int), ("height", int), ("mtime", float)):
        v = meta.pop(key, None)
        if v is not None and (
            isinstance(v, bool)
            or not isinstance(v, (int, float, np.integer, np.floating))
            or not math.isfinite(v)
            or not 0 <= v <= _INT64_MAX
        ):
            raise InvalidInputError(f"{key} must be a non-negative number below 2**63, got {v!r}")
        if v is not None and kind is int and v != int(v):
            raise InvalidInputError(f"{key} must be a whole number, got {v!r}")
        row[key] = kind(_UNKNOWN_INT if v is None else v)
    try:
        row["meta"] = json.dumps(meta, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"metadata must be JSON-serialisable: {e}") from None
    return row


def row_columns(paths: Sequence[str], metadata: Sequence[dict | None] | None) -> dict[str, list]:
    """The stored columns (FIELDS) of rows given as paths + one metadata dict (or None) per path."""
    if isinstance(metadata, dict) or (metadata is not None and len(metadata) != len(paths)):
        raise InvalidInputError("metadata must be a list with one dict (or None) per path")
    if metadata is None or all(m is None for m in metadata):  # fast path: no per-row work beyond the path check
        for p in paths:
            check_path(p)
        n = len(paths)
        return {
            "path": list(paths),
            "sha256": [""] * n,
            "size": [_UNKNOWN_INT] * n,
            "width": [_UNKNOWN_INT] * n,
            "height": [_UNKNOWN_INT] * n,
            "mtime": [float(_UNKNOWN_INT)] * n,
            "tags": [[]] * n,
            "meta": ["{}"] * n,
        }
    rows = [row_values(p, m) for p, m in zip(paths, metadata)]
    return {name: [r[name] for r in rows] for name in FIELDS}


def make_hit(row: dict, score: float) -> Hit:
    """A Hit from stored columns (unknown sentinels -> None)."""

    def known(v):
        return None if v is None or v == _UNKNOWN_INT else v

    meta = row.get("meta") or {}
    return Hit(
        path=row["path"],
        score=float(score),
        id=int(row["id"]),
        sha256=row.get("sha256") or None,
        size=known(row.get("size")),
        width=known(row.get("width")),
        height=known(row.get("height")),
        mtime=known(row.get("mtime")),
        tags=list(row.get("tags") or []),
        metadata=json.loads(meta) if isinstance(meta, str) else dict(meta),
    )


def check_embeddings(embeddings: Any, n: int | None, dim: int, name: str = "embeddings") -> np.ndarray:
    """(n, dim) float32, L2-normalised (in float64: tiny rows too); n=None accepts any count. Rows that are not
    finite or all zero have no direction: InvalidInputError."""
    x = ops.as_matrix(embeddings, name)
    if x.shape[1] != dim:
        raise ModelMismatchError(f"{name} have {x.shape[1]} dims, the gallery {dim}")
    if n is not None and len(x) != n:
        raise InvalidInputError(f"{len(x)} {name} for {n} paths")
    x = x.astype(np.float64)  # (n, D)
    if not np.isfinite(x).all():
        raise InvalidInputError(f"{name} contain NaN or infinite values")
    scale = np.abs(x).max(axis=1, keepdims=True) if len(x) else np.ones((0, 1))  # (n, 1): no underflow below
    if (scale == 0).any():
        raise InvalidInputError(f"{name} row {int(np.flatnonzero(scale[:, 0] == 0)[0])} is all zeros (no direction)")
    x = x / scale
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_identity(dim: int, model_id: str, **extra: Any) -> dict:
    """The identity stored with a gallery."""
    if not isinstance(model_id, str) or not model_id:
        raise InvalidInputError("model_id must be a non-empty str")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise InvalidInputError(f"dim must be a positive int, got {dim!r}")
    return {**{k: v for k, v in extra.items() if v is not None}, "model_id": model_id, "dim": int(dim)}


class Gallery(ABC):
    """An image gallery searchable by embedding. Gallery.create / Gallery.open pick the backend from the URI:

    - a local folder (default, embedded, no server): FAISS IVF index + Parquet segments (local.py);
    - `http://host:19530` / `https://...` (a Milvus server or cluster) or a `*.db` file (milvus-lite) (milvus.py);
      the Milvus collection is `clip_gallery` unless the URI ends with `?collection=NAME`.
    """

    identity: dict

    # ------------------------------------------------------------------------------------------ lifecycle
    @staticmethod
    def create(
        uri: str,
        dim: int,
        model_id: str,
        *,
        exist_ok: bool = False,
        expected_rows: int | None = None,
        index: str | None = None,
        pq_m: int | None = None,
        **identity: Any,
    ) -> Gallery:
        """A new, empty gallery at `uri` for embeddings of `dim` from model `model_id` (identity: e.g. logit_scale).

        With exist_ok=True an existing gallery of the same model is opened instead (another model: ModelMismatchError).
        expected_rows sizes the embedded index for a gallery that will grow that large (fewer retrainings).
        index ("pq", the default, or "ivf") and pq_m pick the embedded gallery's index (see gallery/local.py).
        """
        ident = make_identity(dim, model_id, **identity)
        uri = as_uri(uri)
        backend = _backend(uri)
        if exist_ok and backend.exists(uri):
            g = backend.open(uri)
            if (g.model_id, g.dim) != (ident["model_id"], ident["dim"]):
                g.close()
                raise ModelMismatchError(
                    f"{uri} holds a gallery of model {g.model_id} (dim {g.dim}), not of model {ident['model_id']} "
                    f"(dim {ident['dim']}): embeddings of different models are not comparable - re-index the images "
                    "into another uri with this model"
                )
            return g
        if index is None and pq_m is None:
            return backend.create(uri, ident, expected_rows)
        if is_milvus_uri(uri):
            raise InvalidInputError("index= and pq_m= apply to the embedded (folder) gallery only")
        return backend.create(uri, ident, expected_rows, index=index, pq_m=pq_m)

    @staticmethod
    def open(uri: str) -> Gallery:
        """An existing gallery (InvalidInputError when there is none at `uri`)."""
        uri = as_uri(uri)
        return _backend(uri).open(uri)

    @property
    def dim(self) -> int:
        """Embedding size."""
        return int(self.identity["dim"])

    @property
    def model_id(self) -> str:
        """Identity of the model whose embeddings the gallery holds."""
        return str(self.identity["model_id"])

    def check_identity(self, identity: Any) -> None:
        """Raise ModelMismatchError unless `identity` (a ModelInfo or dict) is the model that embedded this gallery."""
        theirs = identity.identity() if hasattr(identity, "identity") else dict(identity)
        mine = (self.model_id, self.dim)
        other = (theirs.get("model_id"), int(theirs.get("dim", -1)))
        if mine != other:
            raise ModelMismatchError(
                f"the gallery was embedded by model {mine[0]} (dim {mine[1]}) but the server serves model "
                f"{other[0]} (dim {other[1]}); embeddings of different models are not comparable - "
                f"re-index the images with this server or point --url at the server that built the gallery"
            )

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:  # noqa: B027 - an optional hook: backends without resources keep the no-op
        """Release files / connections."""

    # ------------------------------------------------------------------------------------------ rows
    @abstractmethod
    def __len__(self) -> int:
        """Number of rows."""

    @abstractmethod
    def add(self, paths: Sequence[str], embeddings: np.ndarray, metadata: Sequence[dict | None] | None = None) -> None:
        """Add one row per path (duplicate paths are allowed: each is its own row). metadata per row: the keys
        sha256, size, width, height, mtime, tags fill those columns; every other key goes to the JSON `meta`."""

    @abstractmethod
    def delete(self, paths: str | Sequence[str] | None = None, filter: str | None = None) -> int:
        """Delete the rows with these paths (one str: that path) and/or matching the filter; returns how many were
        deleted."""

    @abstractmethod
    def rows(self, filter: str | None = None, fields: Sequence[str] = FIELDS) -> list[dict]:
        """Stored rows (with their `id`) matching the filter, all rows when None; no embeddings."""

    @abstractmethod
    def embeddings(self, ids: Sequence[int]) -> np.ndarray:
        """The stored (normalised) embeddings of rows `ids`, in that order -> (len(ids), dim)."""

    @abstractmethod
    def search(
        self, queries: np.ndarray, k: int = 10, filter: str | None = None, exact: bool = False
    ) -> list[list[Hit]]:
        """The k rows most similar to each query row (cosine), best first: one list of hits per query. exact=True
        scores every row (no approximate index): slower, for checking recall or when it must be exact."""

    def info(self) -> dict:
        """What the gallery holds and how it searches (index, its parameters, the measured recall when known)."""
        return {"rows": len(self), "dim": self.dim, "model_id": self.model_id}

    def tune(self, queries: np.ndarray | None = None, target_recall: float = 0.95, k: int = 10) -> dict:
        """Measure recall@k against exact search on a sample of queries and store the cheapest search parameters
        that reach target_recall (the operating point); returns it."""
        raise InvalidInputError(f"{type(self).__name__} has no tunable operating point")

    # ------------------------------------------------------------------------------------------ failures
    @abstractmethod
    def record_failures(self, failures: Sequence[dict]) -> None:
        """Remember files that could not be embedded: dicts {path, sha256, size, mtime, reason} (replaces by path)."""

    @abstractmethod
    def failures(self) -> dict[str, dict]:
        """path -> the failure recorded for it."""

    @abstractmethod
    def forget_failures(self, paths: Sequence[str]) -> None:
        """Drop the failures recorded for these paths."""

    # ------------------------------------------------------------------------------------------ conveniences
    def find(self, paths: str | Sequence[str]) -> dict[str, list[int]]:
        """path -> ids of its rows, for the paths that are in the gallery (one str: that path)."""
        from .filters import in_list

        paths = as_paths(paths)
        found: dict[str, list[int]] = {}
        for lo in range(0, len(paths), 256):
            for r in self.rows(filter=in_list("path", paths[lo : lo + 256]), fields=("path",)):
                found.setdefault(r["path"], []).append(int(r["id"]))
        return found

    def similar(self, path: str, k: int = 10, filter: str | None = None, exact: bool = False) -> list[Hit]:
        """Rows most similar to the stored embedding of `path` (an indexed image), best first (itself included)."""
        ids = self.find([path]).get(path)
        if not ids:
            raise InvalidInputError(f"{path!r} is not in the gallery")
        return self.search(self.embeddings(ids[:1]), k, filter, exact=exact)[0]

    def search_text(
        self, client: Any, texts: str | Sequence[str], k: int = 10, filter: str | None = None, exact: bool = False
    ) -> list[list[Hit]]:
        """Embed texts with a CLIPClient (same model as the gallery, checked) and search: one list per text."""
        self.check_identity(client.get_model_info())
        return self.search(client.encode_text(texts), k, filter, exact=exact)

    def search_image(
        self, client: Any, images: Any, k: int = 10, filter: str | None = None, exact: bool = False
    ) -> list[list[Hit]]:
        """Embed images (paths, bytes, PIL images, arrays) with a CLIPClient and search: one list per image."""
        self.check_identity(client.get_model_info())
        return self.search(client.encode_image(images), k, filter, exact=exact)


def check_k(k: int) -> int:
    """k as an int >= 1."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidInputError(f"k must be an int >= 1, got {k!r}")
    return int(k)


def check_fields(fields: Sequence[str]) -> list[str]:
    """Row fields asked for, all known (InvalidInputError otherwise)."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise InvalidInputError(f"unknown fields {sorted(unknown)}; fields: {', '.join(FIELDS)}")
    return list(fields)


def check_delete(paths: str | Sequence[str] | None, filter: str | None) -> list[str] | None:
    """delete() needs something to select rows by; returns the paths as a list (one str: that path)."""
    if paths is None and filter is None:
        raise InvalidInputError("delete needs paths and/or a filter")
    return as_paths(paths)


def is_milvus_uri(uri: str) -> bool:
    """Milvus server URIs (http[s]://, tcp://) and milvus-lite files (*.db)."""
    base = str(uri).split("?", 1)[0]
    return str(uri).startswith(("http://", "https://", "tcp://", "grpc://")) or base.endswith(".db")


def as_uri(uri: Any) -> str:
    """A gallery URI as str: a str or os.PathLike (bytes are refused: TypeError)."""
    if isinstance(uri, (bytes, bytearray)) or (hasattr(uri, "__fspath__") and isinstance(os.fspath(uri), bytes)):
        raise TypeError("a gallery URI must be a str or os.PathLike of str, not bytes")
    if not isinstance(uri, (str, os.PathLike)):
        raise InvalidInputError(f"a gallery URI must be a str or path, got {type(uri).__name__}")
    return os.fspath(uri)


def _backend(uri: str):
    """The backend class for a URI (imported lazily: each needs its client extra)."""
    if is_milvus_uri(uri):
        from .milvus import MilvusGallery

        return MilvusGallery
    from .local import LocalGallery

    return LocalGallery
