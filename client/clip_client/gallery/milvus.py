"""The Gallery API on Milvus (a server, a cluster, or the embedded milvus-lite for a `*.db` file), via pymilvus.

URI: `http://host:19530` (token from $MILVUS_TOKEN when set) or `path/to/gallery.db`; the collection is
`clip_gallery` unless the URI ends with `?collection=NAME`. One collection per gallery: the row columns of base.py,
an auto-generated INT64 id, the embedding as FLOAT_VECTOR (inner product on normalised vectors = cosine) and the
model identity in the collection's properties. Failed files live in the side collection `<name>_failures`.
Filters are passed to Milvus as written (after the same validation as the embedded backend). Milvus' own errors
come out as GalleryError (pymilvus' traceback-carrying error log is silenced: the message is in the exception).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from ..errors import InvalidInputError, ServerError
from . import filters
from .base import (
    FIELDS,
    MAX_PATH,
    MAX_TAG,
    MAX_TAGS,
    Gallery,
    GalleryError,
    Hit,
    as_paths,
    check_delete,
    check_embeddings,
    check_fields,
    check_k,
    make_hit,
    require,
    row_columns,
)

DEFAULT_COLLECTION = "clip_gallery"
IDENTITY_PROPERTY = "clip_triton_gallery"
BATCH = 1000  # rows per insert / query page
# The vector index: HNSW on inner product. Text queries are out of distribution for a graph built on image embeddings
# (the modality gap: big-ann-benchmarks 2023 OOD track, RoarGraph): a wide build (efConstruction) and a wide search
# (ef) keep their recall; docs/benchmarks.md (Retrieval) has the numbers behind the defaults. tune() measures
# recall@k against exact search and raises ef until it reaches the target.
INDEX = {"index_type": "HNSW", "metric_type": "IP", "params": {"M": 32, "efConstruction": 360}}
DEFAULT_EF = 256  # HNSW candidates per search (Milvus' own default is k): >= 10 k for OOD text queries
MAX_EF = 32768  # Milvus' limit


def _milvus_errors(fn):
    """Report Milvus' errors (MilvusException, e.g. DataNotMatchException) as GalleryError."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            errors = sys.modules.get("pymilvus.exceptions")  # not imported: the error cannot be one of Milvus'
            if errors is None or not isinstance(e, errors.MilvusException):
                raise
            raise GalleryError(f"Milvus: {getattr(e, 'message', None) or e}") from None

    return wrapped


def split_uri(uri: str) -> tuple[str, str]:
    """(connection URI, collection name) from `URI[?collection=NAME]`."""
    base, _, query = uri.partition("?")
    names = parse_qs(query).get("collection", [DEFAULT_COLLECTION])
    name = names[-1]
    if not name.replace("_", "").isalnum() or not name[0].isalpha():
        raise InvalidInputError(f"collection name must be letters, digits and _, starting with a letter: {name!r}")
    if urlsplit(base).scheme in ("http", "https", "tcp", "grpc") and not urlsplit(base).port:
        raise InvalidInputError(f"a Milvus URI needs a port, e.g. http://host:19530, got {base!r}")
    return base, name


def _connect(uri: str):
    pymilvus = require("pymilvus", "milvus", "a Milvus gallery")
    logging.getLogger("pymilvus.decorators").setLevel(logging.CRITICAL)  # logs each failed call with a traceback
    token = os.environ.get("MILVUS_TOKEN", "")
    try:
        return pymilvus.MilvusClient(uri=uri, token=token) if token else pymilvus.MilvusClient(uri=uri)
    except Exception as e:  # noqa: BLE001 - pymilvus raises its own hierarchy and plain ConnectionErrors
        raise ServerError(f"cannot connect to Milvus at {uri}: {e}") from None


class MilvusGallery(Gallery):
    """A gallery stored in a Milvus collection. Use Gallery.create / Gallery.open with a Milvus URI."""

    def __init__(self, client: Any, name: str, identity: dict):
        self.client = client
        self.name = name
        self.failures_name = f"{name}_failures"
        self.identity = identity
        props = identity.get("search") or {}
        self.ef = int(props.get("ef", DEFAULT_EF))  # HNSW search width: recall vs latency (tune() sets it)

    @classmethod
    @_milvus_errors
    def exists(cls, uri: str) -> bool:
        """Whether the collection exists."""
        base, name = split_uri(uri)
        client = _connect(base)
        try:
            return bool(client.has_collection(name))
        finally:
            client.close()

    @classmethod
    @_milvus_errors
    def create(cls, uri: str, identity: dict, expected_rows: int | None = None) -> MilvusGallery:
        """A new collection (InvalidInputError when it exists) with an HNSW index (INDEX); expected_rows is not
        needed by Milvus."""
        from pymilvus import DataType

        base, name = split_uri(uri)
        client = _connect(base)
        if client.has_collection(name):
            client.close()
            raise InvalidInputError(f"Milvus collection {name!r} exists at {base}: open it with Gallery.open")
        schema = client.create_schema(auto_id=True, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("path", DataType.VARCHAR, max_length=MAX_PATH)
        schema.add_field("sha256", DataType.VARCHAR, max_length=64)
        for col in ("size", "width", "height"):
            schema.add_field(col, DataType.INT64)
        schema.add_field("mtime", DataType.DOUBLE)
        schema.add_field(
            "tags", DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=MAX_TAGS, max_length=MAX_TAG
        )
        schema.add_field("meta", DataType.JSON)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=int(identity["dim"]))
        index = client.prepare_index_params()
        index.add_index("embedding", **INDEX)
        client.create_collection(
            name,
            schema=schema,
            index_params=index,
            consistency_level="Strong",
            properties={IDENTITY_PROPERTY: json.dumps(identity, sort_keys=True)},
        )
        return cls(client, name, identity)

    @classmethod
    @_milvus_errors
    def open(cls, uri: str) -> MilvusGallery:
        """The gallery in an existing collection."""
        base, name = split_uri(uri)
        client = _connect(base)
        if not client.has_collection(name):
            client.close()
            raise InvalidInputError(f"no Milvus collection {name!r} at {base}")
        raw = (client.describe_collection(name).get("properties") or {}).get(IDENTITY_PROPERTY)
        if raw is None:
            client.close()
            raise InvalidInputError(f"Milvus collection {name!r} is not a clip-triton gallery (no {IDENTITY_PROPERTY})")
        client.load_collection(name)
        if client.has_collection(f"{name}_failures"):  # a new process finds it released, like the main one
            client.load_collection(f"{name}_failures")
        return cls(client, name, json.loads(raw))

    def close(self) -> None:
        """Close the connection."""
        self.client.close()

    # ------------------------------------------------------------------------------------------ rows
    @_milvus_errors
    def __len__(self) -> int:
        return int(self.client.query(self.name, filter="", output_fields=["count(*)"])[0]["count(*)"])

    @_milvus_errors
    def add(self, paths: Sequence[str], embeddings: np.ndarray, metadata: Sequence[dict | None] | None = None) -> None:
        """Insert rows (in pages of BATCH)."""
        paths = list(paths)
        emb = check_embeddings(embeddings, len(paths), self.dim)  # (n, D)
        cols = row_columns(paths, metadata)
        cols["meta"] = [json.loads(m) for m in cols["meta"]]
        cols["embedding"] = emb.tolist()
        rows = [dict(zip(cols, values)) for values in zip(*cols.values())]
        for lo in range(0, len(rows), BATCH):
            self.client.insert(self.name, rows[lo : lo + BATCH])

    def _where(self, paths: list[str] | None, filter: str | None) -> str:
        parts = []
        if paths is not None:
            parts.append(filters.in_list("path", paths))
        if filter is not None:
            filters.parse(filter)
            parts.append(f"({filter})")
        return " or ".join(parts)

    @_milvus_errors
    def delete(self, paths: str | Sequence[str] | None = None, filter: str | None = None) -> int:
        """Delete rows by path (one str: that path) and/or filter."""
        paths = check_delete(paths, filter)
        if paths == [] and filter is None:
            return 0
        where = self._where(paths, filter)
        n = int(self.client.query(self.name, filter=where, output_fields=["count(*)"])[0]["count(*)"])
        if n:
            self.client.delete(self.name, filter=where)
        return n

    @_milvus_errors
    def rows(self, filter: str | None = None, fields: Sequence[str] = FIELDS) -> list[dict]:
        """Rows (with id) matching the filter, paged through a query iterator."""
        fields = check_fields(fields)
        where = self._where(None, filter) if filter is not None else ""
        it = self.client.query_iterator(self.name, batch_size=BATCH, filter=where, output_fields=list(fields))
        out: list[dict] = []
        try:
            while page := it.next():
                out.extend({"id": r["id"], **{f: r.get(f) for f in fields}} for r in page)
        finally:
            it.close()
        for r in out:
            if "meta" in r:
                r["meta"] = json.dumps(r["meta"] or {}, sort_keys=True)
            if "tags" in r:
                r["tags"] = list(r["tags"] or [])
        return out

    @_milvus_errors
    def embeddings(self, ids: Sequence[int]) -> np.ndarray:
        """Stored embeddings of rows `ids`, in that order."""
        ids = [int(i) for i in ids]
        got = {int(r["id"]): r["embedding"] for r in self.client.get(self.name, ids=ids, output_fields=["embedding"])}
        missing = [i for i in ids if i not in got]
        if missing:
            raise InvalidInputError(f"no rows with ids {missing[:5]}")
        return np.asarray([got[i] for i in ids], np.float32).reshape(len(ids), self.dim)

    @_milvus_errors
    def search(
        self, queries: np.ndarray, k: int = 10, filter: str | None = None, exact: bool = False
    ) -> list[list[Hit]]:
        """Top-k rows per query (Milvus HNSW search with ef = max(self.ef, k), inner product on normalised
        vectors); exact=True scores every row here (the rows' embeddings are read page by page)."""
        q = check_embeddings(queries, None, self.dim, "queries")  # (Q, D)
        k = check_k(k)
        where = self._where(None, filter) if filter is not None else ""
        if not len(q):
            return []
        if exact:
            return self._exact(q, k, where)
        answers = self.client.search(
            self.name,
            data=q.tolist(),
            limit=k,
            filter=where,
            output_fields=list(FIELDS),
            search_params=self.search_params(k),
        )
        return [[make_hit({**h["entity"], "id": h["id"]}, h["distance"]) for h in hits] for hits in answers]

    def search_params(self, k: int) -> dict:
        """What search() sends Milvus: IP, and the HNSW width ef (at least k)."""
        return {"metric_type": "IP", "params": {"ef": min(MAX_EF, max(self.ef, k))}}

    def _exact(self, q: np.ndarray, k: int, where: str) -> list[list[Hit]]:
        best: list[list[tuple[float, dict]]] = [[] for _ in range(len(q))]
        it = self.client.query_iterator(
            self.name, batch_size=BATCH, filter=where, output_fields=["id", *FIELDS, "embedding"]
        )
        try:
            while page := it.next():
                emb = np.asarray([r.pop("embedding") for r in page], np.float32)  # (n, D)
                scores = q @ emb.T  # (Q, n)
                for qi in range(len(q)):
                    top = np.argsort(-scores[qi], kind="stable")[:k]
                    best[qi] = sorted(
                        best[qi] + [(float(scores[qi, j]), page[j]) for j in top], key=lambda t: (-t[0], t[1]["id"])
                    )[:k]
        finally:
            it.close()
        return [[make_hit(row, s) for s, row in hits] for hits in best]

    def info(self) -> dict:
        """Rows, the index Milvus built and the search width."""
        desc = self.client.describe_index(self.name, "embedding") or {}
        return {
            "uri": self.name,
            "rows": len(self),
            "dim": self.dim,
            "model_id": self.model_id,
            "index": desc.get("index_type"),
            "index_params": {k: desc.get(k) for k in ("M", "efConstruction") if k in desc},
            "ef": self.ef,
            "operating_point": (self.identity.get("search") or None),
        }

    @_milvus_errors
    def tune(self, queries: np.ndarray | None = None, target_recall: float = 0.95, k: int = 10) -> dict:
        """Measure recall@k of the HNSW search against exact search and store the smallest ef (from k, doubling)
        reaching target_recall in the collection's properties. queries None: OOD-like probes from stored rows."""
        if not 0 < target_recall <= 1:
            raise InvalidInputError(f"target_recall must be in (0, 1], got {target_recall!r}")
        if queries is None:
            rows = self.client.query(self.name, filter="", output_fields=["embedding"], limit=2000)
            x = np.asarray([r["embedding"] for r in rows], np.float32).reshape(-1, self.dim)
            if not len(x):
                return {"ef": self.ef, "recall": None}
            x = x - x.mean(axis=0)  # the modality offset removed: what a text query shares with the images
            q = check_embeddings(x[np.random.default_rng(0).permutation(len(x))[:200]], None, self.dim, "queries")
        else:
            q = check_embeddings(queries, None, self.dim, "queries")
        truth = [{h.id for h in hits} for hits in self._exact(q, k, "")]
        ef, saved = max(16, k), self.ef
        while True:
            self.ef = ef
            found = [{h.id for h in hits} for hits in self.search(q, k)]
            recall = float(np.mean([len(f & t) / max(1, len(t)) for f, t in zip(found, truth)]))
            if recall >= target_recall or ef >= MAX_EF:
                break
            ef = min(MAX_EF, 2 * ef)
        self.ef = saved
        point = {
            "ef": ef,
            "recall": round(recall, 4),
            "target": target_recall,
            "k": k,
            "n_queries": len(q),
            "queries": "given" if queries is not None else "gallery probes (OOD-like)",
        }
        self.identity = {**self.identity, "search": point}
        self.client.alter_collection_properties(
            self.name, properties={IDENTITY_PROPERTY: json.dumps(self.identity, sort_keys=True)}
        )
        self.ef = ef
        return point

    # ------------------------------------------------------------------------------------------ failures
    @_milvus_errors
    def _failures_collection(self) -> None:
        from pymilvus import DataType

        if self.client.has_collection(self.failures_name):
            return
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("path", DataType.VARCHAR, max_length=MAX_PATH, is_primary=True)
        schema.add_field("record", DataType.JSON)
        schema.add_field("v", DataType.FLOAT_VECTOR, dim=2)  # Milvus needs a vector field; unused
        index = self.client.prepare_index_params()
        index.add_index("v", index_type="AUTOINDEX", metric_type="L2")
        self.client.create_collection(self.failures_name, schema=schema, index_params=index, consistency_level="Strong")

    @_milvus_errors
    def record_failures(self, failures: Sequence[dict]) -> None:
        """Upsert failure records by path."""
        if not failures:
            return
        self._failures_collection()
        rows = [
            {"path": f["path"], "record": {k: f.get(k) for k in ("sha256", "size", "mtime", "reason")}, "v": [0.0, 0.0]}
            for f in failures
        ]
        self.client.upsert(self.failures_name, rows)

    @_milvus_errors
    def failures(self) -> dict[str, dict]:
        """path -> {sha256, size, mtime, reason}."""
        if not self.client.has_collection(self.failures_name):
            return {}
        it = self.client.query_iterator(self.failures_name, batch_size=BATCH, filter="", output_fields=["record"])
        out: dict[str, dict] = {}
        try:
            while page := it.next():
                out.update({r["path"]: dict(r["record"]) for r in page})
        finally:
            it.close()
        return out

    @_milvus_errors
    def forget_failures(self, paths: Sequence[str]) -> None:
        """Drop failure records."""
        paths = as_paths(paths)
        if paths and self.client.has_collection(self.failures_name):
            self.client.delete(self.failures_name, ids=paths)
