"""The embedded gallery (no server): Parquet segments hold the rows, a FAISS index answers the searches.

A gallery is a folder:
    gallery.json          manifest: identity, segment and tombstone files, next row id, the index's files
    segments/NNNNNNNN.parquet   rows (id, path, sha256, size, width, height, mtime, tags, meta, embedding as
                          fixed_size_binary(4*D): float32 little-endian, L2-normalised); each
                          add() writes one new segment (O(batch)); optimize() merges small ones and drops deleted rows
    tombstones/NNNNNNNN.parquet ids deleted since their segment was written
    index/ivf-NNNNNNNN.faiss + .ivfdata   FAISS IVF-Flat (inner product) whose inverted lists live in a memory-mapped
                          file (OnDiskInvertedLists): adds append to it in place, reopening maps it (milliseconds)
    failures.json         files that could not be embedded (path -> sha256, size, mtime, reason)

Below TRAIN_AT rows the search is exact (an in-memory flat index rebuilt from the segments at open). At TRAIN_AT
rows an IVF index is trained (nlist ~ sqrt of the expected size); it is retrained when the gallery outgrows its
training size RETRAIN_FACTOR times, or on optimize(retrain=True). The Parquet segments are the truth: an index
that disagrees with them at open (e.g. after a crash) is rebuilt from them. One writer at a time (a lock file).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CLIPClientError, InvalidInputError
from . import filters
from .base import FIELDS, FORMAT_VERSION, Gallery, Hit, check_embeddings, check_k, make_hit, require, row_columns

log = logging.getLogger("clip_client.gallery")

MANIFEST = "gallery.json"
META_KEY = b"clip_triton_gallery"
TRAIN_AT = 32_768  # rows: exact search below, IVF from here on
RETRAIN_FACTOR = 16  # retrain when the gallery holds this many times the rows the index was sized for
DEFAULT_NPROBE = 16
SMALL_SEGMENT = 65_536  # rows: optimize() merges segments smaller than this
MAX_SMALL_SEGMENTS = 64  # add() merges the small segments when there are more of them


class GalleryLockedError(CLIPClientError):
    """Another process is writing the gallery."""


def nlist_for(rows: int) -> int:
    """IVF list count for a gallery of `rows`: the power of two nearest sqrt(rows), within [256, 4096]."""
    return int(min(4096, max(256, 2 ** round(math.log2(max(1.0, math.sqrt(rows)))))))


def _schema(dim: int, identity: dict):
    import pyarrow as pa

    return pa.schema([
        pa.field("id", pa.int64(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("width", pa.int64(), nullable=False),
        pa.field("height", pa.int64(), nullable=False),
        pa.field("mtime", pa.float64(), nullable=False),
        pa.field("tags", pa.list_(pa.string()), nullable=False),
        pa.field("meta", pa.string(), nullable=False),
        pa.field("embedding", pa.binary(4 * dim), nullable=False),  # float32 little-endian, L2-normalised
    ], metadata={META_KEY: json.dumps({"format_version": FORMAT_VERSION, **identity}, sort_keys=True).encode()})


def _write_atomic(path: Path, write) -> None:
    """write(tmp_path), then rename over `path` (readers never see half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """FAISS' OnDiskInvertedLists printf()s "resizing ..." to fd 1 when its file grows: keep it off the CLI's output."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


class LocalGallery(Gallery):
    """A gallery in a local folder (see the module docstring). Use Gallery.create / Gallery.open."""

    def __init__(self, root: Path, manifest: dict):
        self.faiss = require("faiss", "gallery", "the embedded gallery")
        self.pa = require("pyarrow", "gallery", "the embedded gallery")
        self.pq = require("pyarrow.parquet", "gallery", "the embedded gallery")
        self.root = root
        self.manifest = manifest
        self.identity = dict(manifest["identity"])
        self.nprobe = DEFAULT_NPROBE  # IVF lists scanned per query: recall vs latency
        self._lock_fd: int | None = None
        self._schema = _schema(self.dim, self.identity)
        self._rows = self._read_rows()  # live rows without embeddings, id order
        self._ids_cache: np.ndarray | None = None
        self._index = self._load_index()

    # ------------------------------------------------------------------------------------------ lifecycle
    @classmethod
    def exists(cls, uri: str) -> bool:
        """Whether `uri` holds a gallery."""
        return (Path(uri) / MANIFEST).is_file()

    @classmethod
    def create(cls, uri: str, identity: dict, expected_rows: int | None = None) -> "LocalGallery":
        """A new empty gallery in folder `uri` (which must not hold one already)."""
        require("faiss", "gallery", "the embedded gallery")
        root = Path(uri)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            what = "a gallery" if cls.exists(uri) else "not an empty folder"
            raise InvalidInputError(f"{str(root)!r} is {what}: open it with Gallery.open or pick a new folder")
        for sub in ("segments", "tombstones", "index"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        manifest = {"format_version": FORMAT_VERSION, "identity": identity, "segments": [], "tombstones": [],
                    "next_id": 0, "next_seq": 1, "index": None, "expected_rows": int(expected_rows or 0)}
        _write_atomic(root / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))
        return cls(root, manifest)

    @classmethod
    def open(cls, uri: str) -> "LocalGallery":
        """The gallery in folder `uri`."""
        require("faiss", "gallery", "the embedded gallery")
        root = Path(uri)
        if not cls.exists(uri):
            hint = " (a single-file gallery of an older clip-triton: re-index the images)" if root.is_file() else ""
            raise InvalidInputError(f"{str(root)!r} is not a clip-triton gallery{hint}")
        try:
            manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InvalidInputError(f"cannot read {root / MANIFEST}: {e}") from None
        if manifest.get("format_version") != FORMAT_VERSION:
            raise InvalidInputError(f"{str(root)!r}: unsupported gallery format {manifest.get('format_version')}")
        return cls(root, manifest)

    def close(self) -> None:
        """Release the write lock and the index."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._index = None

    def _lock(self) -> None:
        """Take the gallery's write lock for this object's lifetime (GalleryLockedError when another holds it)."""
        if self._lock_fd is not None:
            return
        import fcntl

        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise GalleryLockedError(f"{self.root} is being written by another process") from None
        self._lock_fd = fd

    def _save_manifest(self) -> None:
        _write_atomic(self.root / MANIFEST, lambda p: p.write_text(json.dumps(self.manifest, indent=1)))

    def _next_seq(self) -> int:
        seq = self.manifest["next_seq"]
        self.manifest["next_seq"] = seq + 1
        return seq

    # ------------------------------------------------------------------------------------------ storage
    def _segment_files(self) -> list[Path]:
        return [self.root / "segments" / s["file"] for s in self.manifest["segments"]]

    def _deleted_ids(self) -> np.ndarray:
        parts = [self.pq.read_table(self.root / "tombstones" / f).column("id").to_numpy() for f in self.manifest["tombstones"]]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def _read_rows(self):
        """Live rows of every segment, without embeddings."""
        cols = ["id", *FIELDS]
        tables = [self.pq.read_table(f, columns=cols, schema=self._schema) for f in self._segment_files()]
        rows = (self.pa.concat_tables(tables) if tables else self._schema.empty_table().select(cols)).combine_chunks()
        dead = self._deleted_ids()
        if len(dead):
            rows = rows.filter(~np.isin(rows.column("id").to_numpy(), dead))
        return rows

    def _ids(self) -> np.ndarray:
        """Live row ids, ascending."""
        if self._ids_cache is None:
            self._ids_cache = self._rows.column("id").to_numpy()
        return self._ids_cache

    def _iter_embeddings(self, ids: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, embeddings (n, D)) of live rows, one segment at a time; only `ids` when given."""
        live = self._ids()
        for seg, f in zip(self.manifest["segments"], self._segment_files()):
            lo, hi = np.searchsorted(live, [seg["min_id"], seg["max_id"] + 1])
            want = live[lo:hi] if ids is None else np.intersect1d(live[lo:hi], ids)
            if not len(want):
                continue
            t = self.pq.read_table(f, columns=["id", "embedding"])
            sid = t.column("id").to_numpy()
            take = np.searchsorted(sid, want)
            emb = self._vectors(t.column("embedding"))  # (n, D)
            yield want, emb[take]

    def embeddings(self, ids: Sequence[int]) -> np.ndarray:
        """Stored embeddings of rows `ids`, in that order -> (len(ids), D)."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        out = np.zeros((len(ids), self.dim), np.float32)
        found = np.zeros(len(ids), bool)
        for got_ids, emb in self._iter_embeddings(np.unique(ids)):
            pos = {int(i): k for k, i in enumerate(got_ids)}
            for j, i in enumerate(ids):
                if int(i) in pos:
                    out[j], found[j] = emb[pos[int(i)]], True
        if not found.all():
            raise InvalidInputError(f"no rows with ids {ids[~found][:5].tolist()}")
        return out

    def __len__(self) -> int:
        return self._rows.num_rows

    def add(self, paths: Sequence[str], embeddings: np.ndarray, metadata: Sequence[dict | None] | None = None) -> None:
        """Append rows: one new segment file, the index extended in place."""
        paths = list(paths)
        emb = check_embeddings(embeddings, len(paths), self.dim)  # (n, D)
        cols = row_columns(paths, metadata)
        if not paths:
            return
        self._lock()
        start = self.manifest["next_id"]
        ids = np.arange(start, start + len(paths), dtype=np.int64)
        vectors = self.pa.FixedSizeBinaryArray.from_buffers(self.pa.binary(4 * self.dim), len(paths),
                                                            [None, self.pa.py_buffer(emb.astype("<f4").tobytes())])
        table = self.pa.Table.from_pydict({"id": ids, **cols, "embedding": vectors}, schema=self._schema)
        seq = self._next_seq()
        name = f"{seq:08d}.parquet"
        _write_atomic(self.root / "segments" / name, lambda p: self._write_segment(table, p))
        self.manifest["segments"].append({"file": name, "rows": len(paths), "min_id": int(ids[0]), "max_id": int(ids[-1])})
        self.manifest["next_id"] = int(ids[-1]) + 1
        self._rows = self.pa.concat_tables([self._rows, table.drop_columns(["embedding"])])
        if self._rows.column("id").num_chunks > 64:
            self._rows = self._rows.combine_chunks()
        self._ids_cache = None
        self._index_add(ids, emb)
        self._save_manifest()
        if sum(s["rows"] < SMALL_SEGMENT for s in self.manifest["segments"]) > MAX_SMALL_SEGMENTS:
            self._compact()

    def _vectors(self, column) -> np.ndarray:
        """A fixed_size_binary embedding column -> (n, D) float32 (no copy)."""
        arr = column.combine_chunks()
        data = np.frombuffer(arr.buffers()[1], dtype="<f4", count=(arr.offset + len(arr)) * self.dim)
        return data[arr.offset * self.dim:].reshape(len(arr), self.dim)

    def _write_segment(self, table, path: Path) -> None:
        others = [c for c in table.column_names if c != "embedding"]
        self.pq.write_table(table, path, compression={c: ("none" if c == "embedding" else "zstd") for c in table.column_names},
                            use_dictionary=others, write_statistics=["id"])

    def delete(self, paths: Sequence[str] | None = None, filter: str | None = None) -> int:
        """Delete rows by path and/or filter: a tombstone file, the ids removed from the index."""
        if paths is None and filter is None:
            raise InvalidInputError("delete needs paths and/or a filter")
        mask = np.zeros(len(self), bool)
        if paths is not None:
            mask |= filters.is_in(self._rows.column("path"), list(paths))
        if filter is not None:
            mask |= filters.evaluate(filters.parse(filter), self._rows)
        ids = self._ids()[mask]
        if not len(ids):
            return 0
        self._lock()
        name = f"{self._next_seq():08d}.parquet"
        _write_atomic(self.root / "tombstones" / name,
                      lambda p: self.pq.write_table(self.pa.table({"id": self.pa.array(ids, self.pa.int64())}), p))
        self.manifest["tombstones"].append(name)
        self._rows = self._rows.filter(~mask)
        self._ids_cache = None
        with _quiet_stdout():
            self._index.remove_ids(ids)
        self._save_index()
        self._save_manifest()
        return int(len(ids))

    def rows(self, filter: str | None = None, fields: Sequence[str] = FIELDS) -> list[dict]:
        """Live rows (with id) matching the filter."""
        table = self._rows
        if filter is not None:
            table = table.filter(filters.evaluate(filters.parse(filter), table))
        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise InvalidInputError(f"unknown fields {sorted(unknown)}; fields: {', '.join(FIELDS)}")
        return table.select(["id", *fields]).to_pylist()

    def optimize(self, retrain: bool = False) -> None:
        """Merge small segments and drop deleted rows; with retrain=True (or when due) rebuild the index for the
        gallery's current size."""
        self._lock()
        self._compact()
        idx = self.manifest["index"]
        if retrain or (idx and len(self) > RETRAIN_FACTOR * idx["sized_for"]):
            self._build_index(ivf=len(self) >= TRAIN_AT)

    def _compact(self) -> None:
        """Rewrite the small segments (and every segment with deleted rows) as one, without the deleted rows."""
        dead = self._deleted_ids()
        segs, files = self.manifest["segments"], self._segment_files()
        pick = []
        for s, f in zip(segs, files):
            has_dead = len(dead) and np.any((dead >= s["min_id"]) & (dead <= s["max_id"]))
            if s["rows"] < SMALL_SEGMENT or has_dead:
                pick.append((s, f))
        if len(pick) < 2 and not len(dead):
            return
        parts = []
        for _, f in pick:
            t = self.pq.read_table(f, schema=self._schema)
            parts.append(t.filter(~np.isin(t.column("id").to_numpy(), dead)) if len(dead) else t)
        merged = self.pa.concat_tables(parts).combine_chunks() if parts else None
        keep = [s for s in segs if all(s is not p for p, _ in pick)]
        if merged is not None and merged.num_rows:
            name = f"{self._next_seq():08d}.parquet"
            _write_atomic(self.root / "segments" / name, lambda p: self._write_segment(merged, p))
            ids = merged.column("id").to_numpy()
            keep.append({"file": name, "rows": merged.num_rows, "min_id": int(ids[0]), "max_id": int(ids[-1])})
        keep.sort(key=lambda s: s["min_id"])
        old_tombs = list(self.manifest["tombstones"])
        self.manifest["segments"], self.manifest["tombstones"] = keep, []
        self._save_manifest()
        for _, f in pick:
            f.unlink(missing_ok=True)
        for t in old_tombs:
            (self.root / "tombstones" / t).unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------ failures
    def record_failures(self, failures: Sequence[dict]) -> None:
        """Remember files that could not be embedded (failures.json, replaced atomically)."""
        if not failures:
            return
        self._lock()
        known = self.failures()
        known.update({f["path"]: {k: f.get(k) for k in ("sha256", "size", "mtime", "reason")} for f in failures})
        self._save_failures(known)

    def failures(self) -> dict[str, dict]:
        """path -> {sha256, size, mtime, reason}."""
        path = self.root / "failures.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def forget_failures(self, paths: Sequence[str]) -> None:
        """Drop recorded failures."""
        known = self.failures()
        if any(p in known for p in paths):
            self._lock()
            self._save_failures({p: v for p, v in known.items() if p not in set(paths)})

    def _save_failures(self, known: dict) -> None:
        _write_atomic(self.root / "failures.json", lambda p: p.write_text(json.dumps(known, indent=1, sort_keys=True)))

    # ------------------------------------------------------------------------------------------ index
    def _index_files(self, entry: dict) -> tuple[Path, Path]:
        base = self.root / "index" / entry["name"]
        return base.with_suffix(".faiss"), base.with_suffix(".ivfdata")

    def _load_index(self):
        """The stored IVF index (memory-mapped lists) or, for small galleries, a flat index built from the segments;
        rebuilt from the segments when it disagrees with them."""
        entry = self.manifest["index"]
        if entry is not None:
            header, _ = self._index_files(entry)
            try:
                with _quiet_stdout():  # it prints the list file's name
                    index = self.faiss.read_index(str(header), self.faiss.IO_FLAG_ONDISK_SAME_DIR)
                if index.ntotal == len(self):
                    index.nprobe = self.nprobe
                    return index
                log.warning("%s: the index holds %d rows, the segments %d: rebuilding it", self.root, index.ntotal, len(self))
            except RuntimeError as e:
                log.warning("%s: cannot read the index (%s): rebuilding it", self.root, e)
            return self._build_index(ivf=True)
        return self._flat_index()

    def _flat_index(self):
        index = self.faiss.IndexIDMap2(self.faiss.IndexFlatIP(self.dim))
        for ids, emb in self._iter_embeddings():
            index.add_with_ids(emb, ids)
        return index

    def _build_index(self, ivf: bool):
        """A new index over every live row: IVF-Flat on memory-mapped lists (trained here) or flat."""
        self._lock()
        old = self.manifest["index"]
        if not ivf:
            self._index = self._flat_index()
            self.manifest["index"] = None
        else:
            sized_for = max(len(self), self.manifest.get("expected_rows") or 0)
            nlist = nlist_for(sized_for)
            quantizer = self.faiss.IndexFlatIP(self.dim)
            index = self.faiss.IndexIVFFlat(quantizer, self.dim, nlist, self.faiss.METRIC_INNER_PRODUCT)
            index.cp.niter = 10
            index.cp.min_points_per_centroid = 1  # small first trainings are fine: retrained as the gallery grows
            index.cp.max_points_per_centroid = 64
            index.train(self._training_sample(64 * nlist))
            entry = {"name": f"ivf-{self._next_seq():08d}", "nlist": nlist, "sized_for": sized_for}
            header, data = self._index_files(entry)
            lists = self.faiss.OnDiskInvertedLists(nlist, index.code_size, str(data))
            index.replace_invlists(lists, True)
            lists.this.disown()  # owned by the index now
            index.nprobe = self.nprobe
            with _quiet_stdout():
                for ids, emb in self._iter_embeddings():
                    index.add_with_ids(emb, ids)
            self._index = index
            self.manifest["index"] = entry
            self._save_index()
        self._save_manifest()
        if old is not None:
            for f in self._index_files(old):
                f.unlink(missing_ok=True)
        return self._index

    def _training_sample(self, n: int) -> np.ndarray:
        """Up to n live embeddings, drawn evenly from every segment -> (m, D)."""
        frac = min(1.0, n / max(1, len(self)))
        rng = np.random.default_rng(0)
        parts = [emb[rng.random(len(emb)) < frac] for _, emb in self._iter_embeddings()]
        return np.ascontiguousarray(np.concatenate(parts)[:n])

    def _index_add(self, ids: np.ndarray, emb: np.ndarray) -> None:
        entry = self.manifest["index"]
        if entry is None and len(self) >= TRAIN_AT:
            self._build_index(ivf=True)  # trains on every row, the new ones included
            return
        if entry is not None and len(self) > RETRAIN_FACTOR * entry["sized_for"]:
            self._build_index(ivf=True)
            return
        with _quiet_stdout():
            self._index.add_with_ids(emb, ids)
        self._save_index()

    def _save_index(self) -> None:
        """Write the IVF header (quantizer + list offsets; the lists themselves are already in their file)."""
        entry = self.manifest["index"]
        if entry is not None:
            header, _ = self._index_files(entry)
            _write_atomic(header, lambda p: self.faiss.write_index(self._index, str(p)))

    # ------------------------------------------------------------------------------------------ search
    def search(self, queries: np.ndarray, k: int = 10, filter: str | None = None) -> list[list[Hit]]:
        """Top-k rows per query (cosine), best first; a filter restricts the rows searched."""
        q = check_embeddings(queries, None, self.dim, "queries")  # (Q, D)
        k = check_k(k)
        if len(self) == 0:
            return [[] for _ in range(len(q))]
        ivf = self.manifest["index"] is not None
        nprobe = self.nprobe
        bitmap = None
        if filter is not None:
            mask = filters.evaluate(filters.parse(filter), self._rows)
            allowed = self._ids()[mask]
            if not len(allowed):
                return [[] for _ in range(len(q))]
            bits = np.zeros(self.manifest["next_id"], bool)
            bits[allowed] = True
            bitmap = np.packbits(bits, bitorder="little")
            # a filter keeping a fraction f of the rows: scan 1/f times the lists (all of them for rare matches)
            nprobe = math.ceil(nprobe * len(self) / len(allowed))
        k = min(k, len(self) if bitmap is None else len(allowed))
        params = self.faiss.SearchParametersIVF() if ivf else self.faiss.SearchParameters()
        if bitmap is not None:
            params.sel = self.faiss.IDSelectorBitmap(len(bitmap), self.faiss.swig_ptr(bitmap))
        nlist = self.manifest["index"]["nlist"] if ivf else 1
        if ivf:
            params.nprobe = min(nlist, nprobe)
        scores, ids = self._index.search(q, k, params=params)  # (Q, k)
        short = (ids < 0).any(axis=1)
        while ivf and short.any() and params.nprobe < nlist:
            # the probed lists held fewer than k rows (many deletes, or a rare filter): widen the scan
            params.nprobe = min(nlist, 4 * params.nprobe)
            scores[short], ids[short] = self._index.search(q[short], k, params=params)
            short = (ids < 0).any(axis=1)
        return self._hits(scores, ids)

    def _hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[Hit]]:
        valid = ids >= 0
        pos = np.searchsorted(self._ids(), ids[valid])
        rows = self._rows.take(self.pa.array(pos)).to_pylist()
        out, it = [], iter(rows)
        for qi in range(len(ids)):
            out.append([make_hit(next(it), s) for s, ok in zip(scores[qi], valid[qi]) if ok])
        return out
