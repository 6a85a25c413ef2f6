"""The embedded gallery (no server): Arrow segment files hold the rows, a FAISS index answers the searches.

A gallery is a folder:
    gallery.json          manifest: identity, segment and tombstone files, next row id, the index's files
    segments/NNNNNNNN.arrow   rows (id, path, sha256, size, width, height, mtime, tags, meta, embedding as
                          fixed_size_binary(4*D): float32 little-endian, L2-normalised) in Arrow IPC files, read
                          memory-mapped (zero copy); each add() writes one new segment (O(batch)); optimize() rewrites
                          segments with deleted rows and merges runs of small ones (row ids never change)
    tombstones/NNNNNNNN.arrow ids deleted since their segment was written
    index/pqfs-NNNNNNNN.faiss  (default index kind "pq") FAISS 4-bit PQ fast-scan codes (inner product, M bytes/2 per
                          row) with their ids, one file read whole at open (no mapping: a short file is an error,
                          never a signal) and rewritten atomically after each add (its space reserved first)
    index/ivfsq8-NNNNNNNN.faiss + .ivfdata   (index kind "ivf") FAISS IVF with 8-bit scalar-quantised codes whose
                          inverted lists live in a memory-mapped file (OnDiskInvertedLists): adds append to it in
                          place (the disk blocks reserved first), reopening maps it (milliseconds)
    failures.json         files that could not be embedded (path -> sha256, size, mtime, reason)

Search: below TRAIN_AT rows exact (an in-memory flat index built from the segments at open). From TRAIN_AT rows,
index kind "pq" (the default): every row's PQ code is scanned (fast-scan, nothing routed, so queries from another
modality lose nothing to a coarse quantiser trained on images) for the best k * `rerank` candidates, re-scored
exactly against the stored float32 vectors; tune() picks `rerank`; PQ codebooks are retrained like the IVF below.
Index kind "ivf": an IVF-SQ8 index (spherical k-means, nlist ~ 2 sqrt(rows), `nprobe` lists scanned) proposes
k * `rerank` candidates per query, re-scored exactly against the stored float32 vectors (memory-mapped): scores are
exact cosines. The index is retrained (nlist re-sized) when the gallery outgrows the rows it was trained on
RETRAIN_FACTOR times, or on
optimize(retrain=True); after each training tune() calibrates `nprobe`: recall@10 against exact search on OOD-like
probes (stored vectors minus the gallery's mean: text queries share the concept, not the image modality's offset)
reaching TUNE_TARGET; tune(queries) re-measures on real queries. search(exact=True) scores every row. Deleted rows
stay in the index, skipped by every search, until it is rebuilt.
Integrity: the manifest records each segment's size and CRC-32, the PQ file's or the IVF header's CRC-32 (and size);
opening checks sizes, Arrow footers, row counts and id ranges, and the manifest against them (next_id, next_seq);
check_gallery() (`clip-triton gallery-check`) also verifies the checksums and repairs what derives from the
segments. The segments are the truth: an index header that disagrees with the manifest at open (a crash between
the two) is rebuilt from them; a list file shorter than its header is a GalleryError (it would be read past its end).
One writer at a time (a lock file, taken by the first write and held until close(); another writer meanwhile gets
GalleryLockedError); readers open a snapshot. A writer reloads the manifest (and what it lists) when it takes the
lock, so that it writes on top of what writers before it committed: nothing is lost, no file name is reused.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import math
import os
import sys
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..errors import InvalidInputError
from . import filters
from .base import (
    FIELDS,
    FORMAT_VERSION,
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

log = logging.getLogger("clip_client.gallery")
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs which CPU build it loads at INFO

MANIFEST = "gallery.json"
META_KEY = b"clip_triton_gallery"
TRAIN_AT = 32_768  # rows: exact search below, the trained index (PQ fast-scan or IVF-SQ8) from here on
INDEX_KINDS = ("pq", "ivf")
DEFAULT_INDEX = "pq"  # exhaustive 4-bit PQ fast-scan + exact re-rank (docs/benchmarks.md, Retrieval)
PQ_TRAIN_ROWS = 65_536  # training sample of the PQ codebooks
DEFAULT_PQ_RERANK = 26  # PQ candidates re-scored per query, as a multiple of k, until tune() has measured
MIN_PQ_CANDIDATES = 256  # tune() re-ranks at least this many PQ candidates per query (a margin: they are cheap)
MAX_PQ_CANDIDATES = 8192  # tune() stops here (and stores the best it measured): more would cost as much as exact
PQ_ONE_THREAD_BELOW = 16  # queries: smaller batches scan the codes on one OpenMP thread (see _pq_search)
PQ_FILTER_EXACT = 0.05  # a filter keeping less than this fraction of the rows is searched exactly
RETRAIN_FACTOR = 4  # retrain (nlist x2) when the gallery holds this many times the rows the index was trained on
DEFAULT_NPROBE = 16  # IVF lists scanned per query until tune() has measured an operating point
MIN_NPROBE = 8  # tune() never goes below this
DEFAULT_RERANK = 4  # candidates re-scored exactly per query, as a multiple of k
TUNE_TARGET = 0.97  # recall@10 the automatic calibration after each (re)training aims for (on OOD-like probes)
TUNE_QUERIES = 200  # probe queries per calibration
RECENT_QUERIES = 1024  # real queries kept (in memory) for tune()
SMALL_SEGMENT = 65_536  # rows: optimize() merges runs of segments smaller than this
MAX_SMALL_SEGMENTS = 64  # add() compacts when there are more small segments than this


class GalleryLockedError(GalleryError):
    """Another process (or Gallery object) is writing the gallery."""


def _storage(fn):
    """Report the file system's errors (no such folder, permission denied, disk full) as GalleryError."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            raise GalleryError(f"gallery storage: {e.strerror or e}{where}") from None

    return wrapped


def nlist_for(rows: int) -> int:
    """IVF list count for a gallery of `rows`: the power of two nearest 2 * sqrt(rows), within [64, 4096]
    (docs/benchmarks.md, Retrieval: smaller lists hold fewer concepts each, so text queries find theirs)."""
    return int(min(4096, max(64, 2 ** round(math.log2(max(1.0, 2 * math.sqrt(rows)))))))


def pq_m_for(dim: int) -> int:
    """Default PQ sub-quantiser count: dim / 16 (16 bytes per 512-d row; at least 16, or dim / 2, for small dims),
    a divisor of dim."""
    m = max(1, dim // 16, min(16, dim // 2))
    while dim % m:
        m -= 1
    return m


def check_index_kind(kind: str | None) -> str | None:
    if kind is not None and kind not in INDEX_KINDS:
        raise InvalidInputError(f"index must be one of {', '.join(INDEX_KINDS)}, got {kind!r}")
    return kind


def _entry_kind(entry: dict) -> str:
    return entry.get("kind", "ivf")


def _index_files(root: Path, entry: dict) -> list[Path]:
    """The files of an index entry: PQ one .faiss file; IVF its header (.faiss) and its lists (.ivfdata)."""
    base = root / "index" / entry["name"]
    if _entry_kind(entry) == "pq":
        return [base.with_suffix(".faiss")]
    return [base.with_suffix(".faiss"), base.with_suffix(".ivfdata")]


def _schema(dim: int, identity: dict):
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            pa.field("path", pa.string(), nullable=False),
            pa.field("sha256", pa.string(), nullable=False),
            pa.field("size", pa.int64(), nullable=False),
            pa.field("width", pa.int64(), nullable=False),
            pa.field("height", pa.int64(), nullable=False),
            pa.field("mtime", pa.float64(), nullable=False),
            pa.field("tags", pa.list_(pa.string()), nullable=False),
            pa.field("meta", pa.string(), nullable=False),
            pa.field("embedding", pa.binary(4 * dim), nullable=False),
        ],
        metadata={META_KEY: json.dumps({"format_version": FORMAT_VERSION, **identity}, sort_keys=True).encode()},
    )


def _read_manifest(root: Path) -> dict:
    """The manifest of the gallery in `root` (InvalidInputError when unreadable or of another format)."""
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InvalidInputError(f"cannot read {root / MANIFEST}: {e}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise InvalidInputError(f"{str(root)!r}: unsupported gallery format {manifest.get('format_version')}")
    return manifest


def _crc32(path: Path) -> int:
    """CRC-32 of a file's bytes (read in 4 MiB blocks)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(4 << 20):
            crc = zlib.crc32(block, crc)
    return crc


def _write_atomic(path: Path, write) -> None:
    """write(tmp_path), then rename over `path` (readers never see half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file behind
        raise


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


class _Segment:
    """One memory-mapped segment file: its manifest entry, table, ids (ascending) and vectors (n, D). Checked
    cheaply against its manifest entry (size, Arrow footer, row count, id range): GalleryError naming the file."""

    def __init__(self, entry: dict, path: Path, dim: int):
        import pyarrow as pa

        self.entry = entry
        try:
            size = path.stat().st_size
        except OSError as e:
            raise GalleryError(f"segment {path}: {e.strerror or e} (run `clip-triton gallery-check`)") from None
        if "bytes" in entry and size != entry["bytes"]:
            raise GalleryError(
                f"segment {path} is {size} bytes, the manifest says {entry['bytes']}: truncated or "
                "replaced (run `clip-triton gallery-check`)"
            )
        try:
            self.source = pa.memory_map(str(path), "r")  # the table's buffers point into this mapping (no copy)
            self.table = pa.ipc.open_file(self.source).read_all()
        except (pa.ArrowException, OSError) as e:
            raise GalleryError(
                f"segment {path} is not a readable Arrow file ({e}): truncated or damaged "
                "(run `clip-triton gallery-check`)"
            ) from None
        if self.table.column("id").num_chunks > 1:  # written as one record batch; anything else is copied once
            self.table = self.table.combine_chunks()
        self.ids = self.table.column("id").to_numpy()
        if len(self.ids) != entry["rows"] or (
            len(self.ids) and (self.ids[0], self.ids[-1]) != (entry["min_id"], entry["max_id"])
        ):
            raise GalleryError(
                f"segment {path} holds {len(self.ids)} rows with ids "
                f"{self.ids[:1].tolist()}..{self.ids[-1:].tolist()}, the manifest says {entry['rows']} "
                f"rows with ids {entry['min_id']}..{entry['max_id']} (run `clip-triton gallery-check`)"
            )
        emb = self.table.column("embedding").chunk(0) if self.table.num_rows else None
        self.vectors = (
            np.frombuffer(emb.buffers()[1], "<f4", count=(emb.offset + len(emb)) * dim)[emb.offset * dim :].reshape(
                len(emb), dim
            )
            if emb is not None
            else np.zeros((0, dim), np.float32)
        )  # (n, D)


def _check_manifest(root: Path, manifest: dict) -> None:
    """The manifest's own consistency: segment id ranges ordered and disjoint, next_id past every stored id,
    next_seq past every file name (a hand-edited or stale manifest would reuse ids or overwrite files)."""
    last = -1
    seqs = [0]
    for e in manifest["segments"]:
        lo, hi = e.get("min_id"), e.get("max_id")
        if not (isinstance(lo, int) and isinstance(hi, int) and last < lo <= hi):
            raise GalleryError(
                f"{root / MANIFEST}: segment {e.get('file')} has ids {lo}..{hi} after ids up to "
                f"{last}: the manifest is damaged (run `clip-triton gallery-check`)"
            )
        last = e["max_id"]
        seqs.append(int(str(e["file"]).split(".")[0]))
    if not isinstance(manifest.get("next_id"), int) or manifest["next_id"] <= last:
        raise GalleryError(
            f"{root / MANIFEST}: next_id {manifest.get('next_id')} but the segments hold ids up to "
            f"{last}: new rows would reuse ids (run `clip-triton gallery-check --repair`)"
        )
    seqs += [int(str(n).split(".")[0]) for n in manifest["tombstones"]]
    if manifest["index"]:
        seqs.append(int(manifest["index"]["name"].rsplit("-", 1)[1]))
    if not isinstance(manifest.get("next_seq"), int) or manifest["next_seq"] <= max(seqs):
        raise GalleryError(
            f"{root / MANIFEST}: next_seq {manifest.get('next_seq')} but file number {max(seqs)} "
            "exists: new files would overwrite it (run `clip-triton gallery-check --repair`)"
        )


# Tries to map a consistent snapshot while a writer merges segments (each try reads the manifest anew).
OPEN_ATTEMPTS = 5


class LocalGallery(Gallery):
    """A gallery in a local folder (see the module docstring). Use Gallery.create / Gallery.open."""

    def __init__(self, root: Path, manifest: dict):
        self.faiss = require("faiss", "gallery", "the embedded gallery")
        self.pa = require("pyarrow", "gallery", "the embedded gallery")
        self.root = root
        self.manifest = manifest
        self.identity = dict(manifest["identity"])
        self.nprobe = DEFAULT_NPROBE  # IVF lists scanned per query: recall vs latency (tune() sets it)
        self.rerank = DEFAULT_RERANK  # k * rerank candidates re-scored exactly per query
        self._recent: collections.deque = collections.deque(maxlen=RECENT_QUERIES)  # real queries, for tune()
        self._fallback = False  # True: the index was being rewritten at open; this snapshot is searched exactly
        self._lock_fd: int | None = None
        self._schema = _schema(self.dim, self.identity)
        self._load_segments()
        self._index = self._load_index()

    # ------------------------------------------------------------------------------------------ lifecycle
    @classmethod
    def exists(cls, uri: str) -> bool:
        """Whether `uri` holds a gallery."""
        return (Path(uri) / MANIFEST).is_file()

    @classmethod
    @_storage
    def create(
        cls,
        uri: str,
        identity: dict,
        expected_rows: int | None = None,
        index: str | None = None,
        pq_m: int | None = None,
    ) -> LocalGallery:
        """A new empty gallery in folder `uri` (which must not hold one already); index: "pq" (default) or "ivf";
        pq_m: PQ sub-quantisers (a divisor of dim; default dim / 16)."""
        require("faiss", "gallery", "the embedded gallery")
        check_index_kind(index)
        dim = int(identity["dim"])
        if pq_m is not None and (isinstance(pq_m, bool) or not isinstance(pq_m, int) or pq_m < 1 or dim % pq_m):
            raise InvalidInputError(f"pq_m must be a positive divisor of the dimension {dim}, got {pq_m!r}")
        root = Path(uri)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            what = "a gallery" if cls.exists(uri) else "not an empty folder"
            raise InvalidInputError(f"{str(root)!r} is {what}: open it with Gallery.open or pick a new folder")
        for sub in ("segments", "tombstones", "index"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        manifest = {
            "format_version": FORMAT_VERSION,
            "identity": identity,
            "segments": [],
            "tombstones": [],
            "next_id": 0,
            "next_seq": 1,
            "index": None,
            "expected_rows": int(expected_rows or 0),
            "index_kind": index or DEFAULT_INDEX,
            "pq_m": int(pq_m or pq_m_for(dim)),
        }
        _write_atomic(root / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))
        return cls(root, manifest)

    @classmethod
    @_storage
    def open(cls, uri: str) -> LocalGallery:
        """The gallery in folder `uri`."""
        require("faiss", "gallery", "the embedded gallery")
        root = Path(uri)
        if not cls.exists(uri):
            hint = " (a single-file gallery of an older clip-triton: re-index the images)" if root.is_file() else ""
            raise InvalidInputError(f"{str(root)!r} is not a clip-triton gallery{hint}")
        manifest = _read_manifest(root)
        for _ in range(OPEN_ATTEMPTS - 1):
            try:
                return cls(root, manifest)
            except GalleryError:
                # a writer may have merged segments between our manifest read and the mapping (it deletes the old
                # files after saving the new manifest): a changed manifest means try again; the same one is damage
                latest = _read_manifest(root)
                if latest == manifest:
                    raise
                manifest = latest
        return cls(root, manifest)

    def close(self) -> None:
        """Release the write lock, the index and the mapped files."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._index = None
        self._segs = []

    def _lock(self) -> None:
        """Take the gallery's write lock for this object's lifetime (GalleryLockedError when another holds it) and
        catch up with what other writers committed since this object read the manifest."""
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
        fresh = _read_manifest(self.root)
        if fresh != self.manifest:  # segment names and row ids continue from the other writer's
            log.debug("%s: changed since it was opened: reloading it before writing", self.root)
            self.manifest = fresh
            self._load_segments()
            self._index = self._load_index()
        self._remove_orphans()

    def _save_manifest(self) -> None:
        _write_atomic(self.root / MANIFEST, lambda p: p.write_text(json.dumps(self.manifest, indent=1)))

    def _next_seq(self) -> int:
        seq = self.manifest["next_seq"]
        self.manifest["next_seq"] = seq + 1
        return seq

    # ------------------------------------------------------------------------------------------ storage
    def _write_table(self, folder: str, table) -> str:
        """A new Arrow IPC file in `folder` (atomic); returns its name."""
        name = f"{self._next_seq():08d}.arrow"

        def write(path: Path) -> None:
            with self.pa.OSFile(str(path), "wb") as sink, self.pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)

        _write_atomic(self.root / folder / name, write)
        return name

    def _file_sums(self, folder: str, name: str) -> dict:
        """Size and CRC-32 of a file just written (the segment's entry in the manifest: checked by gallery-check)."""
        path = self.root / folder / name
        return {"bytes": path.stat().st_size, "crc32": _crc32(path)}

    def _remove_orphans(self) -> None:
        """Delete files no manifest entry names (a writer killed before its manifest was saved, a failed index
        build): run by a writer that just took the lock, so no other writer is creating files."""
        keep = {("segments", e["file"]) for e in self.manifest["segments"]}
        keep |= {("tombstones", n) for n in self.manifest["tombstones"]}
        if self.manifest["index"]:
            keep |= {("index", f.name) for f in _index_files(self.root, self.manifest["index"])}
        for folder in ("segments", "tombstones", "index"):
            for f in (self.root / folder).iterdir():
                if (folder, f.name) not in keep and f.is_file():
                    log.info("%s: removing %s (no manifest entry names it)", self.root, f)
                    f.unlink(missing_ok=True)

    def _load_segments(self) -> None:
        """Map every segment; live rows (no embeddings) in id order; the deleted ids."""
        _check_manifest(self.root, self.manifest)
        self._segs = [_Segment(e, self.root / "segments" / e["file"], self.dim) for e in self.manifest["segments"]]
        dead = []
        for name in self.manifest["tombstones"]:
            path = self.root / "tombstones" / name
            try:
                with self.pa.memory_map(str(path), "r") as source:
                    dead.append(self.pa.ipc.open_file(source).read_all().column("id").to_numpy())
            except (self.pa.ArrowException, OSError) as e:
                raise GalleryError(
                    f"tombstone file {path} is not readable ({e}) (run `clip-triton gallery-check`)"
                ) from None
        self._dead = np.unique(np.concatenate(dead)) if dead else np.zeros(0, np.int64)
        cols = ["id", *FIELDS]
        tables = [s.table.select(cols) for s in self._segs]
        rows = self.pa.concat_tables(tables) if tables else self._schema.empty_table().select(cols)
        if len(self._dead):
            rows = rows.filter(~np.isin(rows.column("id").to_numpy(), self._dead))
        self._rows = rows
        self._ids_cache: np.ndarray | None = None

    def _live_bitmap(self, allowed: np.ndarray | None = None) -> np.ndarray | None:
        """Bitmap over row ids of the rows a search may return (`allowed`, else the live rows; None: all rows)."""
        if allowed is None and not len(self._dead):
            return None
        bits = np.zeros(self.manifest["next_id"], bool)
        bits[self._ids() if allowed is None else allowed] = True
        return np.packbits(bits, bitorder="little")

    def _rows_at(self, pos: np.ndarray) -> list[dict]:
        """Live rows (no embeddings) at positions `pos` of the id-ordered rows."""
        return _take_rows(self._rows, np.asarray(pos, np.int64))

    def _ids(self) -> np.ndarray:
        """Live row ids, ascending."""
        if self._ids_cache is None:
            self._ids_cache = self._rows.column("id").to_numpy()
        return self._ids_cache

    def _vectors_of(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of existing row ids -> (len(ids), D) (gathered from the mapped segments)."""
        out = np.empty((len(ids), self.dim), np.float32)
        starts = np.array([s.entry["min_id"] for s in self._segs], np.int64)
        which = np.searchsorted(starts, ids, side="right") - 1
        for si in np.unique(which):
            sel = which == si
            seg = self._segs[si]
            out[sel] = seg.vectors[np.searchsorted(seg.ids, ids[sel])]
        return out

    def _iter_live(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors (n, D)) of the live rows, one segment at a time."""
        for seg in self._segs:
            live = ~np.isin(seg.ids, self._dead) if len(self._dead) else np.ones(len(seg.ids), bool)
            if live.any():
                yield seg.ids[live], seg.vectors[live]

    def embeddings(self, ids: Sequence[int]) -> np.ndarray:
        """Stored embeddings of rows `ids`, in that order -> (len(ids), D)."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        live = self._ids()
        pos = np.searchsorted(live, ids)
        ok = (
            (pos < len(live)) & (live[np.minimum(pos, len(live) - 1)] == ids) if len(live) else np.zeros(len(ids), bool)
        )
        if not ok.all():
            raise InvalidInputError(f"no rows with ids {ids[~ok][:5].tolist()}")
        return self._vectors_of(ids)

    def __len__(self) -> int:
        return self._rows.num_rows

    @_storage
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
        vectors = self.pa.FixedSizeBinaryArray.from_buffers(
            self.pa.binary(4 * self.dim), len(paths), [None, self.pa.py_buffer(emb.astype("<f4").tobytes())]
        )
        table = self.pa.Table.from_pydict({"id": ids, **cols, "embedding": vectors}, schema=self._schema)
        name = self._write_table("segments", table)
        entry = {
            "file": name,
            "rows": len(paths),
            "min_id": int(ids[0]),
            "max_id": int(ids[-1]),
            **self._file_sums("segments", name),
        }
        self.manifest["segments"].append(entry)
        self.manifest["next_id"] = int(ids[-1]) + 1
        seg = _Segment(entry, self.root / "segments" / name, self.dim)
        self._segs.append(seg)
        self._rows = self.pa.concat_tables([self._rows, seg.table.select(["id", *FIELDS])])
        self._ids_cache = None
        self._index_add(ids, emb)
        self._save_manifest()
        if sum(s["rows"] < SMALL_SEGMENT for s in self.manifest["segments"]) > MAX_SMALL_SEGMENTS:
            self._compact()

    @_storage
    def delete(self, paths: str | Sequence[str] | None = None, filter: str | None = None) -> int:
        """Delete rows by path (one str: that path) and/or filter: a tombstone file, the ids removed from the index."""
        paths = check_delete(paths, filter)
        tree = filters.parse(filter) if filter is not None else None
        if paths == [] and tree is None:
            return 0
        self._lock()  # first: the rows to match are the ones on disk now
        mask = np.zeros(len(self), bool)
        if paths:
            mask |= filters.is_in(self._rows.column("path"), paths)
        if tree is not None:
            mask |= filters.evaluate(tree, self._rows)
        ids = self._ids()[mask]
        if not len(ids):
            return 0
        self.manifest["tombstones"].append(self._write_table("tombstones", self.pa.table({"id": self.pa.array(ids)})))
        self._dead = np.union1d(self._dead, ids)
        self._rows = self._rows.filter(~mask)
        self._ids_cache = None
        self._save_manifest()  # the index keeps the rows (searches skip them) until optimize(retrain=True)
        return int(len(ids))

    def rows(self, filter: str | None = None, fields: Sequence[str] = FIELDS) -> list[dict]:
        """Live rows (with id) matching the filter."""
        fields = check_fields(fields)
        table = self._rows
        if filter is not None:
            table = table.filter(filters.evaluate(filters.parse(filter), table))
        return table.select(["id", *fields]).to_pylist()

    @_storage
    def optimize(self, retrain: bool = False, index: str | None = None) -> None:
        """Drop deleted rows and merge small segments; with retrain=True (or when due) rebuild the index for the
        gallery's current size. index: switch the index kind ("pq" or "ivf"; rebuilt now)."""
        if check_index_kind(index) is not None:
            self._lock()
            entry = self.manifest["index"]
            retrain = retrain or (entry is not None and _entry_kind(entry) != index)
            self.manifest["index_kind"] = index
            self._save_manifest()
        self._lock()
        dropped = self._compact(drop_deleted=True)
        idx = self.manifest["index"]
        if retrain or dropped or (idx and len(self) > RETRAIN_FACTOR * idx.get("trained_on", idx["sized_for"])):
            self._build_index(trained=len(self) >= TRAIN_AT)  # the index still held the dropped rows

    def _compact(self, drop_deleted: bool = False) -> bool:
        """Merge each run of consecutive small segments into one and, with drop_deleted, rewrite segments holding
        deleted rows without them (segment id ranges stay ordered and disjoint; ids never change). Returns whether
        deleted rows were dropped (the index must then be rebuilt: it still holds them)."""
        groups: list[list[_Segment]] = []
        for seg in self._segs:
            small = seg.entry["rows"] < SMALL_SEGMENT
            if small and groups and groups[-1][-1].entry["rows"] < SMALL_SEGMENT:
                groups[-1].append(seg)
            else:
                groups.append([seg])
        dead = self._dead if drop_deleted else np.zeros(0, np.int64)
        entries, old = [], []
        for group in groups:
            has_dead = any(len(dead) and np.isin(s.ids, dead).any() for s in group)
            if len(group) == 1 and not has_dead:
                entries.append(group[0].entry)
                continue
            merged = self.pa.concat_tables([s.table for s in group])
            if has_dead:
                merged = merged.filter(~np.isin(merged.column("id").to_numpy(), dead))
            old += [s.entry["file"] for s in group]
            if merged.num_rows:
                ids = merged.column("id").to_numpy()
                name = self._write_table("segments", merged.combine_chunks())
                entries.append(
                    {
                        "file": name,
                        "rows": merged.num_rows,
                        "min_id": int(ids[0]),
                        "max_id": int(ids[-1]),
                        **self._file_sums("segments", name),
                    }
                )
        tombstones = self.manifest["tombstones"] if drop_deleted else []
        if not old and not tombstones:
            return False
        self.manifest["segments"] = entries
        if drop_deleted:
            self.manifest["tombstones"] = []
        self._save_manifest()
        self._load_segments()
        for name in old:
            (self.root / "segments" / name).unlink(missing_ok=True)
        for name in tombstones:
            (self.root / "tombstones" / name).unlink(missing_ok=True)
        return bool(tombstones)

    # ------------------------------------------------------------------------------------------ failures
    @_storage
    def record_failures(self, failures: Sequence[dict]) -> None:
        """Remember files that could not be embedded (failures.json, replaced atomically)."""
        if not failures:
            return
        self._lock()
        known = self.failures()
        known.update({f["path"]: {k: f.get(k) for k in ("sha256", "size", "mtime", "reason")} for f in failures})
        self._save_failures(known)

    @_storage
    def failures(self) -> dict[str, dict]:
        """path -> {sha256, size, mtime, reason}."""
        path = self.root / "failures.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    @_storage
    def forget_failures(self, paths: Sequence[str]) -> None:
        """Drop recorded failures."""
        paths = set(as_paths(paths))
        if any(p in self.failures() for p in paths):
            self._lock()
            self._save_failures({p: v for p, v in self.failures().items() if p not in paths})

    def _save_failures(self, known: dict) -> None:
        _write_atomic(self.root / "failures.json", lambda p: p.write_text(json.dumps(known, indent=1, sort_keys=True)))

    # ------------------------------------------------------------------------------------------ index
    def _index_files(self, entry: dict) -> tuple[Path, Path]:
        base = self.root / "index" / entry["name"]
        return base.with_suffix(".faiss"), base.with_suffix(".ivfdata")

    def _load_pq(self, entry: dict):
        """The stored PQ fast-scan index, read whole (never mapped: a short file cannot raise a signal); RuntimeError
        when it is missing, short or damaged (the caller rebuilds it from the segments)."""
        (path,) = _index_files(self.root, entry)
        size = path.stat().st_size if path.is_file() else 0
        if size != entry.get("bytes", size) or not size:
            raise RuntimeError(f"{path} is missing or truncated ({size} bytes, the manifest says {entry.get('bytes')})")
        data = np.fromfile(path, np.uint8)
        if "header_crc" in entry and zlib.crc32(data) != entry["header_crc"]:
            raise RuntimeError("checksum mismatch")
        return self.faiss.deserialize_index(data)

    def _load_index(self):
        """The stored IVF-SQ8 index (memory-mapped lists) or, for small galleries, a flat index built from the
        segments; rebuilt from the segments when its header disagrees with them (a crash between the header and the
        manifest); GalleryError when its list file is shorter than the header says (it would be read past its end)."""
        entry = self.manifest["index"]
        if entry is None:
            return self._flat_index()
        op = entry.get("operating_point") or {}
        pq = _entry_kind(entry) == "pq"
        self.nprobe = int(op.get("nprobe") or DEFAULT_NPROBE)
        self.rerank = int(op.get("rerank") or (DEFAULT_PQ_RERANK if pq else DEFAULT_RERANK))
        if pq:
            try:
                index = self._load_pq(entry)
                if index.ntotal == entry["ntotal"]:
                    return index
                problem = f"the index holds {index.ntotal} rows, the manifest says {entry['ntotal']}"
            except (RuntimeError, FileNotFoundError) as e:  # not found: a writer replaced it since
                problem = f"cannot read the index ({e})"
            return self._rebuild_damaged(entry, problem)
        header, data = self._index_files(entry)
        if not header.is_file() or not data.is_file():  # a writer replaced them after this reader read the manifest
            return self._rebuild_damaged(entry, f"{header if not header.is_file() else data} is missing")
        if "ivfdata_bytes" in entry and data.stat().st_size < entry["ivfdata_bytes"]:
            raise GalleryError(
                f"index list file {data} is missing or truncated "
                f"({data.stat().st_size if data.is_file() else 0} bytes, the manifest says "
                f"{entry.get('ivfdata_bytes')}): run `clip-triton gallery-check --repair`"
            )
        try:
            if "header_crc" in entry and _crc32(header) != entry["header_crc"]:
                raise RuntimeError("checksum mismatch")
            with _quiet_stdout():  # it prints the list file's name
                index = self.faiss.read_index(str(header), self.faiss.IO_FLAG_ONDISK_SAME_DIR)
            lists = self.faiss.downcast_InvertedLists(index.invlists)
            if lists.totsize > data.stat().st_size:  # checked before any page of the mapping is touched
                raise GalleryError(
                    f"index list file {data} is truncated ({data.stat().st_size} bytes, its header "
                    f"needs {lists.totsize}): run `clip-triton gallery-check --repair`"
                )
            if index.ntotal == entry["ntotal"]:
                self._no_prefetch(index)
                return index
            problem = f"the index holds {index.ntotal} rows, the manifest says {entry['ntotal']}"
        except (RuntimeError, FileNotFoundError) as e:  # not found: a writer replaced it since
            problem = f"cannot read the index ({e})"
        return self._rebuild_damaged(entry, problem)

    def _rebuild_damaged(self, entry: dict, problem: str):
        """An index that disagrees with the manifest: rebuilt by a writer, searched exactly while another writes."""
        try:
            self._lock()  # a writer that is not done yet (its manifest not saved), or one that died mid-write
        except GalleryLockedError:
            log.info("%s: %s while another process writes: this snapshot is searched exactly", self.root, problem)
            self._fallback = True
            return self._flat_index()
        if self.manifest["index"] != entry:  # the lock reloaded a newer manifest, and its index
            return self._index
        log.warning("%s: %s: rebuilding it", self.root, problem)
        return self._build_index(trained=True)

    def _no_prefetch(self, index) -> None:
        """OnDiskInvertedLists starts 32 prefetch threads per search by default: 4x slower single queries here."""
        self.faiss.downcast_InvertedLists(index.invlists).prefetch_nthread = 0

    def _flat_index(self):
        index = self.faiss.IndexIDMap2(self.faiss.IndexFlatIP(self.dim))
        for ids, vectors in self._iter_live():
            index.add_with_ids(vectors, ids)
        return index

    def _build_index(self, trained: bool):
        """A new index over every live row: the gallery's kind (PQ fast-scan, or IVF-SQ8 on memory-mapped lists;
        trained here) or flat; then calibrated."""
        self._lock()
        old = self.manifest["index"]
        if not trained:
            self._index = self._flat_index()
            self.manifest["index"] = None
        elif self.manifest.get("index_kind", DEFAULT_INDEX) == "pq":
            self._index = self._new_pq()
        else:
            self._index = self._new_ivf()
        if trained:
            self.nprobe = DEFAULT_NPROBE
            self.rerank = DEFAULT_PQ_RERANK if _entry_kind(self.manifest["index"]) == "pq" else DEFAULT_RERANK
        self._save_manifest()
        if old is not None:
            for f in _index_files(self.root, old):
                if self.manifest["index"] is None or f.name != f"{self.manifest['index']['name']}{f.suffix}":
                    f.unlink(missing_ok=True)
        if trained:
            self.tune(target_recall=TUNE_TARGET, queries=None, _auto=True)
        return self._index

    def _new_pq(self):
        """Train 4-bit PQ codebooks (fast-scan, inner product) on a sample of the live rows, encode every live row,
        save the index; the manifest entry is set (not yet saved)."""
        rows = len(self)
        m = int(self.manifest.get("pq_m") or pq_m_for(self.dim))
        index = self.faiss.IndexIDMap(self.faiss.IndexPQFastScan(self.dim, m, 4, self.faiss.METRIC_INNER_PRODUCT))
        with self._omp_threads(1):  # see _omp_threads: 5x faster than 2 threads on a busy 2-core machine
            index.train(self._training_sample(PQ_TRAIN_ROWS))
        self.manifest["index"] = {
            "name": f"pqfs-{self._next_seq():08d}",
            "kind": "pq",
            "m": m,
            "nbits": 4,
            "sized_for": RETRAIN_FACTOR * rows,
            "trained_on": rows,
        }
        self._index = index
        with self._omp_threads(1):
            for ids, vectors in self._iter_live():
                index.add_with_ids(np.ascontiguousarray(vectors), ids)
        self._save_index()
        return index

    def _new_ivf(self):
        """Train an IVF-SQ8 index for the live rows (2-level spherical k-means), fill its lists in a new file whose
        space is reserved first, save it; the manifest entry is set (not yet saved)."""
        rows = len(self)
        sized_for = min(max(2 * rows, self.manifest.get("expected_rows") or 0), RETRAIN_FACTOR * rows)
        nlist = nlist_for(sized_for)
        index = self.faiss.IndexIVFScalarQuantizer(
            self.faiss.IndexFlatIP(self.dim),
            self.dim,
            nlist,
            self.faiss.ScalarQuantizer.QT_8bit,
            self.faiss.METRIC_INNER_PRODUCT,
        )
        # spherical k-means (cosine); retrained as the gallery grows, so a modest sample per list is enough
        index.cp.niter, index.cp.spherical, index.cp.min_points_per_centroid = 10, True, 1
        index.cp.max_points_per_centroid = 32
        index.train(self._training_sample(32 * nlist))
        entry = {
            "name": f"ivfsq8-{self._next_seq():08d}",
            "kind": "ivf",
            "nlist": nlist,
            "sized_for": sized_for,
            "trained_on": rows,
        }
        header, data = self._index_files(entry)
        lists = self.faiss.OnDiskInvertedLists(nlist, index.code_size, str(data))
        index.replace_invlists(lists, True)
        lists.this.disown()  # owned by the index now
        self._no_prefetch(index)
        self.manifest["index"], self._index = entry, index
        parts = [(ids, vectors, self._assign(vectors)) for ids, vectors in self._iter_live()]
        try:
            self._reserve(np.concatenate([a for _, _, a in parts]))
        except BaseException:
            self.manifest["index"] = None
            data.unlink(missing_ok=True)  # no orphan left behind
            raise
        with _quiet_stdout():
            for ids, vectors, assign in parts:
                self._add_preassigned(vectors, ids, assign)
        self._save_index()
        return index

    def _assign(self, x: np.ndarray) -> np.ndarray:
        """Each vector's list (its nearest centroid) -> (n,) int64."""
        if not len(x):
            return np.zeros(0, np.int64)
        return self._index.quantizer.search(np.ascontiguousarray(x), 1)[1][:, 0]

    def _add_preassigned(self, x: np.ndarray, ids: np.ndarray, assign: np.ndarray) -> None:
        x, ids, assign = (np.ascontiguousarray(a) for a in (x, ids.astype(np.int64), assign.astype(np.int64)))
        self._index.add_core(len(x), self.faiss.swig_ptr(x), self.faiss.swig_ptr(ids), self.faiss.swig_ptr(assign))

    def _reserve(self, assign: np.ndarray) -> None:
        """Allocate, before anything is written through the mapping, the disk blocks the lists will grow into:
        a full disk then fails here (GalleryError, nothing written) instead of killing the process with SIGBUS."""
        lists = self.faiss.downcast_InvertedLists(self._index.invlists)
        entry_bytes = lists.code_size + 8
        need = 0
        for lst, m in zip(*np.unique(assign, return_counts=True)):
            size, cap = lists.list_size(int(lst)), lists.lists.at(int(lst)).capacity
            if size + m > cap:  # FAISS adds one entry at a time, moving a full list to a slot twice its size:
                need += 2 * ((1 << int(size + m - 1).bit_length()) - cap) * entry_bytes  # <= cap*2 + cap*4 + ...
        if not need:
            return
        old = int(lists.totsize)
        _, data = self._index_files(self.manifest["index"])
        fd = os.open(data, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.posix_fallocate(fd, old, need)
        except OSError as e:
            os.ftruncate(fd, old)
            raise GalleryError(
                f"gallery storage: no space for the index lists ({need} bytes more): {e.strerror or e}: {data}"
            ) from None
        finally:
            os.close(fd)
        with _quiet_stdout():
            lists.update_totsize(old + need)  # one free slot over the reserved blocks; the file size is unchanged

    def _training_sample(self, n: int) -> np.ndarray:
        """Up to n live embeddings, drawn evenly from every segment -> (m, D)."""
        frac = min(1.0, n / max(1, len(self)))
        rng = np.random.default_rng(0)
        parts = [v[rng.random(len(v)) < frac] for _, v in self._iter_live()]
        return np.ascontiguousarray(np.concatenate(parts)[:n])

    def _index_add(self, ids: np.ndarray, emb: np.ndarray) -> None:
        entry = self.manifest["index"]
        if (entry is None and len(self) >= TRAIN_AT) or (
            entry is not None and len(self) > RETRAIN_FACTOR * entry.get("trained_on", entry["sized_for"])
        ):
            self._build_index(trained=True)  # trains on every row, the new ones included
            return
        if entry is None:
            self._index.add_with_ids(emb, ids)
            return
        if _entry_kind(entry) == "pq":
            with self._omp_threads(1):  # encoding 10k rows: ~0.1 s on one thread, ~0.5 s on two busy ones
                self._index.add_with_ids(np.ascontiguousarray(emb), ids)
            self._save_index()
            return
        assign = self._assign(emb)
        self._reserve(assign)
        with _quiet_stdout():
            self._add_preassigned(emb, ids, assign)
        self._save_index()

    def _save_index(self) -> None:
        """Write the IVF header (quantizers + list offsets; the lists themselves are already in their file)."""
        entry = self.manifest["index"]
        if entry is not None and _entry_kind(entry) == "pq":
            (path,) = _index_files(self.root, entry)
            data = self.faiss.serialize_index(self._index)

            def write(p: Path) -> None:
                with open(p, "wb") as f:
                    try:  # the blocks reserved first: a full disk fails here, before anything is written
                        os.posix_fallocate(f.fileno(), 0, len(data))
                    except OSError as e:
                        raise GalleryError(
                            f"gallery storage: no space for the index ({len(data)} bytes): {e.strerror or e}: {path}"
                        ) from None
                    f.write(memoryview(data))

            _write_atomic(path, write)
            entry.update(ntotal=int(self._index.ntotal), bytes=len(data), header_crc=zlib.crc32(data))
        elif entry is not None:
            header, data = self._index_files(entry)
            _write_atomic(header, lambda p: self.faiss.write_index(self._index, str(p)))
            entry["ntotal"] = int(self._index.ntotal)
            entry["ivfdata_bytes"] = int(self.faiss.downcast_InvertedLists(self._index.invlists).totsize)
            entry["header_crc"] = _crc32(header)

    # ------------------------------------------------------------------------------------------ calibration
    def _probe_queries(self, n: int) -> np.ndarray:
        """OOD-like probes from the gallery itself: stored vectors minus the gallery's mean direction (what a query
        from the other modality shares with the images is their concept, not the image modality's offset)."""
        rng = np.random.default_rng(len(self))
        ids = self._ids()
        pick = np.sort(rng.choice(ids, min(n, len(ids)), replace=False))
        x = self._vectors_of(pick)
        mean = self._training_sample(8192).mean(axis=0)
        q = x - mean
        norm = np.linalg.norm(q, axis=1, keepdims=True)
        return (q / np.where(norm > 0, norm, 1)).astype(np.float32)

    @_storage
    def tune(
        self, queries: np.ndarray | None = None, target_recall: float = 0.95, k: int = 10, _auto: bool = False
    ) -> dict:
        """Measure recall@k against exact search and store the cheapest operating point that reaches `target_recall`
        (PQ: the fewest candidates re-ranked, `rerank` x k; IVF: the fewest lists scanned, `nprobe`), persisted.
        queries: a sample of real queries; None: the recent queries this object served
        when there are enough, else OOD-like probes drawn from the gallery. Returns the operating point."""
        if not 0 < target_recall <= 1:
            raise InvalidInputError(f"target_recall must be in (0, 1], got {target_recall!r}")
        entry = self.manifest["index"]
        if entry is None or self._fallback:
            return {"exact": True, "recall": 1.0}
        if queries is not None:
            q, source = check_embeddings(queries, None, self.dim, "queries"), "given"
        elif len(self._recent) >= 32:
            q, source = np.stack(self._recent), "recent"
        else:
            q, source = self._probe_queries(TUNE_QUERIES), "gallery probes (OOD-like)"
        truth = self._exact(q, k)[1]

        def recall_of(found: np.ndarray) -> float:
            return float(
                np.mean([len(set(f[f >= 0]) & set(t[t >= 0])) / max(1, (t >= 0).sum()) for f, t in zip(found, truth)])
            )

        curve = []  # (nprobe or rerank, recall) measured
        if _entry_kind(entry) == "pq":
            nprobe, nlist, total = None, None, int(self._index.ntotal)
            rerank = math.ceil(MIN_PQ_CANDIDATES / k)  # re-scoring a few hundred rows costs little next to the scan
            while True:  # candidates x2 per step, up to every row
                recall = recall_of(self._pq_search(q, k, rerank, None)[1])
                curve.append([rerank, round(recall, 4)])
                if recall >= target_recall or 2 * k * rerank > min(MAX_PQ_CANDIDATES, total // 4):
                    break
                rerank *= 2
        else:
            nlist, rerank = entry["nlist"], DEFAULT_RERANK
            nprobe = MIN_NPROBE  # in steps of ~1.4x
            while True:
                recall = recall_of(self._ivf_search(q, k, nprobe, rerank, None)[1])
                curve.append([nprobe, round(recall, 4)])
                if recall >= target_recall or nprobe >= nlist:
                    break
                nprobe = min(nlist, int(math.ceil(nprobe * 1.4142)))
        point = {
            "nprobe": nprobe,
            "rerank": rerank,
            "candidates": k * rerank,
            "recall": round(recall, 4),
            "target": target_recall,
            "k": k,
            "queries": source,
            "n_queries": len(q),
            "rows": len(self),
            "nlist": nlist,
            "curve": curve,
        }
        self._lock()
        if self.manifest["index"] is None or self.manifest["index"]["name"] != entry["name"]:
            return point  # another writer rebuilt it meanwhile
        self.manifest["index"]["operating_point"] = point
        self._save_manifest()
        self.nprobe, self.rerank = nprobe or DEFAULT_NPROBE, rerank
        log.log(
            logging.DEBUG if _auto else logging.INFO,
            "%s: nprobe %s of %s lists, %d candidates re-ranked: recall@%d %.3f on %d %s",
            self.root,
            nprobe,
            nlist,
            k * rerank,
            k,
            point["recall"],
            len(q),
            source,
        )
        return point

    def info(self) -> dict:
        """What the gallery holds and how it searches: rows, segments, the index and its operating point."""
        entry = self.manifest["index"]
        return {
            "uri": str(self.root),
            "rows": len(self),
            "dim": self.dim,
            "model_id": self.model_id,
            "segments": len(self.manifest["segments"]),
            "deleted_pending": int(len(self._dead)),
            "index": _index_name(entry),
            "index_kind": self.manifest.get("index_kind", DEFAULT_INDEX),
            **({} if entry is None else {k: entry.get(k) for k in ("nlist", "m", "trained_on", "sized_for")}),
            "nprobe": None if entry is None or _entry_kind(entry) == "pq" else self.nprobe,
            "rerank": None if entry is None else self.rerank,
            "operating_point": None if entry is None else entry.get("operating_point"),
            "recent_queries": len(self._recent),
        }

    # ------------------------------------------------------------------------------------------ search
    def search(
        self, queries: np.ndarray, k: int = 10, filter: str | None = None, exact: bool = False
    ) -> list[list[Hit]]:
        """Top-k rows per query by exact cosine, best first; a filter restricts the rows searched. exact=True: every
        row is scored (no index)."""
        q = check_embeddings(queries, None, self.dim, "queries")  # (Q, D)
        k = check_k(k)
        allowed = None
        if filter is not None:
            allowed = self._ids()[filters.evaluate(filters.parse(filter), self._rows)]
        n = len(self) if allowed is None else len(allowed)
        if n == 0:
            return [[] for _ in range(len(q))]
        if not exact:
            self._recent.extend(q[-RECENT_QUERIES:])
        if exact or self.manifest["index"] is None or self._fallback:
            return self._hits(*self._exact(q, min(k, n), allowed))
        if _entry_kind(self.manifest["index"]) == "pq":
            return self._hits(*self._pq_search(q, min(k, n), self.rerank, allowed))
        nprobe = self.nprobe
        if allowed is not None:  # a filter keeping a fraction f of the rows: scan 1/f times the lists
            nprobe = math.ceil(nprobe * len(self) / max(1, len(allowed)))
        return self._hits(*self._ivf_search(q, min(k, n), nprobe, self.rerank, allowed))

    def _pq_search(
        self, q: np.ndarray, k: int, rerank: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """PQ fast-scan candidates (k * rerank per query, more when rows are deleted or filtered out) re-scored
        exactly -> (Q, k) scores and ids. A filter keeping few rows is searched exactly (cheaper, and complete)."""
        total = int(self._index.ntotal)
        n = len(self) if allowed is None else len(allowed)
        if allowed is not None and n < PQ_FILTER_EXACT * total:
            return self._exact(q, k, allowed)
        ok = None  # deleted rows stay in the index until it is rebuilt: dropped from the candidates here
        if allowed is not None or len(self._dead):
            ok = np.zeros(self.manifest["next_id"] + 1, bool)  # the last slot: ids this snapshot does not know
            ok[self._ids() if allowed is None else allowed] = True
        want = min(total, math.ceil(k * rerank * total / max(1, n)))
        while True:
            if want > total // 4:  # re-scoring that many candidates costs more than scoring every row
                return self._exact(q, k, allowed)
            with self._omp_threads(1 if len(q) < PQ_ONE_THREAD_BELOW else None):
                cand = self._index.search(q, want)[1]  # (Q, want) best first
            if ok is not None:
                cand[~ok[np.where((cand >= 0) & (cand < len(ok) - 1), cand, len(ok) - 1)]] = -1
            if want >= total or ((cand >= 0).sum(axis=1) >= k).all():
                return self._rescore(q, cand, k)
            want = min(total, 4 * want)  # too few allowed rows among the candidates: widen

    @contextlib.contextmanager
    def _omp_threads(self, n: int | None) -> Iterator[None]:
        """This thread's OpenMP team size for a block (None: unchanged). A single query's fast-scan takes ~1-2 ms on
        one thread at 1M rows; waking a team costs more (8 ms p50 with 2 threads on a loaded 2-core machine), and PQ
        encoding of added rows ran at 110-146k rows/s on one thread, 19k on two (same machine, load ~6)."""
        if n is None:
            yield
            return
        before = self.faiss.omp_get_max_threads()
        self.faiss.omp_set_num_threads(n)
        try:
            yield
        finally:
            self.faiss.omp_set_num_threads(before)

    def _ivf_search(
        self, q: np.ndarray, k: int, nprobe: int, rerank: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """IVF candidates (k * rerank per query) re-scored exactly -> (Q, k) scores and ids."""
        params = self.faiss.SearchParametersIVF()
        bitmap = self._live_bitmap(allowed)  # deleted rows stay in the index until it is rebuilt: skipped here
        if bitmap is not None:
            params.sel = self.faiss.IDSelectorBitmap(len(bitmap), self.faiss.swig_ptr(bitmap))
        nlist = self.manifest["index"]["nlist"]
        params.nprobe = min(nlist, nprobe)
        n = len(self) if allowed is None else len(allowed)
        want = min(n, k * rerank)
        _, ids = self._index.search(q, want, params=params)  # (Q, want) candidates, best first
        short = (ids < 0).any(axis=1)
        while short.any() and params.nprobe < nlist:
            # the probed lists held fewer rows than asked for (many deletes, a rare filter): widen the scan
            params.nprobe = min(nlist, 4 * params.nprobe)
            ids[short] = self._index.search(q[short], want, params=params)[1]
            short = (ids < 0).any(axis=1)
        return self._rescore(q, ids, k)

    def _exact(self, q: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over every live (and allowed) row, one segment at a time -> (Q, k) scores and ids (-1 pad)."""
        best_s = np.full((len(q), 0), -np.inf, np.float32)
        best_i = np.zeros((len(q), 0), np.int64)
        for ids, vectors in self._iter_live():
            if allowed is not None:
                keep = np.isin(ids, allowed)
                ids, vectors = ids[keep], vectors[keep]
            for lo in range(0, len(ids), 65536):
                s = q @ vectors[lo : lo + 65536].T  # (Q, chunk)
                s_all = np.concatenate([best_s, s], axis=1)
                i_all = np.concatenate([best_i, np.broadcast_to(ids[lo : lo + 65536], s.shape)], axis=1)
                top = np.argpartition(-s_all, k - 1, axis=1)[:, :k] if s_all.shape[1] > k else None
                if top is not None:
                    s_all, i_all = np.take_along_axis(s_all, top, 1), np.take_along_axis(i_all, top, 1)
                best_s, best_i = s_all, i_all
        order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        scores, ids = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
        if scores.shape[1] < k:
            pad = k - scores.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        return scores, ids

    def _rescore(self, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosines of the candidates against the stored vectors; the top k per query -> (Q, k) each."""
        ok = (cand >= 0) & (cand < self.manifest["next_id"])  # a reader ignores rows added after its snapshot
        exact = np.full(cand.shape, -np.inf, np.float32)
        step = max(1, 65536 // max(1, cand.shape[1]))  # queries per block: at most 64k vectors gathered at once
        for lo in range(0, len(q), step):
            sub = ok[lo : lo + step]
            exact[lo : lo + step][sub] = np.einsum(
                "nd,nd->n",
                self._vectors_of(cand[lo : lo + step][sub]),
                np.repeat(q[lo : lo + step], sub.sum(axis=1), axis=0),
            )
        top = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        scores, ids = np.take_along_axis(exact, top, 1), np.take_along_axis(cand, top, 1)
        ids[~np.isfinite(scores)] = -1
        return scores, ids

    def _hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[Hit]]:
        valid = ids >= 0
        rows = iter(self._rows_at(np.searchsorted(self._ids(), ids[valid])))
        return [[make_hit(next(rows), s) for s, ok in zip(scores[qi], valid[qi]) if ok] for qi in range(len(ids))]


# ---------------------------------------------------------------------------------------------- check / repair
def _segment_max_ids(root: Path, manifest: dict) -> list[int]:
    """The largest id stored in each readable segment (from the files, not the manifest)."""
    import pyarrow as pa

    out = []
    for e in manifest["segments"]:
        try:
            with pa.memory_map(str(root / "segments" / e["file"]), "r") as src:
                ids = pa.ipc.open_file(src).read_all().column("id").to_numpy()
            out += [int(ids.max())] if len(ids) else []
        except (pa.ArrowException, OSError):
            continue
    return out


def check_gallery(uri: str, repair: bool = False) -> tuple[list[str], list[str]]:
    """Verify every file of the gallery in `uri` against the manifest (sizes, CRC-32 of the segments, Arrow
    structure, id ranges, the index's files). repair=True rebuilds what is derived from the segments (the index, the
    manifest's next_id / next_seq, orphan files). Returns (problems found, repairs made); damaged segments cannot
    be repaired (restore them from a backup)."""
    root = Path(uri)
    if not LocalGallery.exists(uri):
        raise InvalidInputError(f"{str(root)!r} is not a clip-triton gallery")
    manifest = _read_manifest(root)
    problems: list[str] = []
    damaged = False
    for e in manifest["segments"]:
        path = root / "segments" / e["file"]
        if "crc32" in e and path.is_file() and path.stat().st_size == e.get("bytes") and _crc32(path) != e["crc32"]:
            problems.append(f"segment {path}: checksum mismatch (its bytes changed since it was written)")
            damaged = True
            continue
        try:
            _Segment(e, path, int(manifest["identity"]["dim"]))
        except GalleryError as err:
            problems.append(str(err))
            damaged = True
    try:
        _check_manifest(root, manifest)
    except GalleryError as err:
        problems.append(str(err))
    derived_ok = True
    entry = manifest["index"]
    if entry is not None and _entry_kind(entry) == "pq":
        (path,) = _index_files(root, entry)
        if not path.is_file() or path.stat().st_size != entry.get("bytes", path.stat().st_size):
            problems.append(f"index file {path}: missing or truncated")
            derived_ok = False
        elif "header_crc" in entry and _crc32(path) != entry["header_crc"]:
            problems.append(f"index file {path}: checksum mismatch")
            derived_ok = False
    elif entry is not None:
        header, data = (root / "index" / f"{entry['name']}{ext}" for ext in (".faiss", ".ivfdata"))
        if not header.is_file() or ("header_crc" in entry and _crc32(header) != entry["header_crc"]):
            problems.append(f"index header {header}: missing or checksum mismatch")
            derived_ok = False
        if not data.is_file() or data.stat().st_size < entry.get("ivfdata_bytes", 0):
            problems.append(f"index list file {data}: missing or truncated")
            derived_ok = False
    repairs: list[str] = []
    if not repair or damaged or not problems:
        return problems, repairs
    top = max(_segment_max_ids(root, manifest), default=-1)
    if manifest["next_id"] <= top:
        manifest["next_id"] = top + 1
        repairs.append(f"next_id set to {top + 1} (past the largest stored id)")
    names = [e["file"] for e in manifest["segments"]] + list(manifest["tombstones"])
    seq = max([int(n.split(".")[0]) for n in names] + [int(entry["name"].rsplit("-", 1)[1]) if entry else 0])
    if manifest["next_seq"] <= seq:
        manifest["next_seq"] = seq + 1
        repairs.append(f"next_seq set to {seq + 1}")
    if not derived_ok:
        manifest["index"] = None  # rebuilt from the segments below
    _write_atomic(root / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))
    g = LocalGallery(root, manifest)
    try:
        g._lock()
        if not derived_ok and len(g) >= TRAIN_AT:
            g._build_index(trained=True)
        if not derived_ok:
            repairs.append(f"index rebuilt from the segments ({len(g)} rows)")
    finally:
        g.close()
    return problems, repairs


def _index_name(entry: dict | None) -> str:
    if entry is None:
        return "exact (flat)"
    if _entry_kind(entry) == "pq":
        return f"PQ{entry['m']}x4 fast-scan (every row) + exact re-rank"
    return "IVF-SQ8 + exact re-rank"


def _take_rows(table, pos: np.ndarray) -> list[dict]:
    """Rows at positions `pos` of a chunked table, in that order, taken chunk by chunk (Table.take would first
    concatenate every segment's chunks: milliseconds per call on a large gallery; one slice per row is slow for
    batches)."""
    batches = table.to_batches()
    ends = np.cumsum([b.num_rows for b in batches])
    which = np.searchsorted(ends, pos, side="right")
    out: list = [None] * len(pos)
    for b in np.unique(which):
        sel = np.flatnonzero(which == b)
        local_pos = pos[sel] - (ends[b - 1] if b else 0)
        for i, row in zip(sel, batches[b].take(local_pos).to_pylist()):
            out[i] = row
    return out
