"""Parquet image galleries and the `clip-triton index | search` commands.

Gallery file: columns path (string), sha256 (string), size (int64), embedding (fixed_size_list<float32>[D],
L2-normalised); file key-value metadata `clip_triton_gallery` = JSON {format_version, model_id, dim, logit_scale,
identity_source}. A gallery is only ever searched with embeddings from the model that wrote it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import ops
from .cli import add_connection_arguments, connect
from .errors import CLIPClientError, InvalidInputError, ModelMismatchError, ServerError

log = logging.getLogger("clip_client.gallery")

META_KEY = b"clip_triton_gallery"
FORMAT_VERSION = 1
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".npy"})


# ------------------------------------------------------------------------------------------- gallery


def require_pyarrow() -> None:
    """Galleries are Parquet: pyarrow comes with the `gallery` extra of the client."""
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise CLIPClientError("galleries need pyarrow: pip install 'clip-triton-client[gallery]' "
                              "(the full clip-triton install has it)") from None



@dataclass
class Gallery:
    """An in-memory gallery: parallel columns plus the identity of the model that embedded it."""

    identity: dict  # {"model_id", "dim", "logit_scale", "identity_source"}
    paths: list[str] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    embeddings: np.ndarray | None = None  # (N, D) float32, normalised

    def __post_init__(self) -> None:
        dim = int(self.identity["dim"])
        if self.embeddings is None:
            self.embeddings = np.zeros((0, dim), np.float32)
        self.embeddings = np.asarray(self.embeddings, np.float32).reshape(-1, dim)
        if not (len(self.paths) == len(self.sha256) == len(self.sizes) == len(self.embeddings)):
            raise ValueError("gallery columns have different lengths")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def dim(self) -> int:
        return int(self.identity["dim"])

    def add(self, paths: list[str], sha256: list[str], sizes: list[int], embeddings: np.ndarray) -> None:
        """Append rows (embeddings get normalised); an existing row with the same path is replaced."""
        if not paths:
            return
        replaced = set(paths)
        keep = [i for i, p in enumerate(self.paths) if p not in replaced]
        if len(keep) != len(self.paths):
            self.take(keep)
        self.paths += list(paths)
        self.sha256 += list(sha256)
        self.sizes += [int(s) for s in sizes]
        emb = ops.l2_normalize(np.asarray(embeddings, np.float32).reshape(len(paths), self.dim))
        self.embeddings = np.concatenate([self.embeddings, emb], axis=0)

    def take(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order)."""
        self.paths = [self.paths[i] for i in rows]
        self.sha256 = [self.sha256[i] for i in rows]
        self.sizes = [self.sizes[i] for i in rows]
        self.embeddings = self.embeddings[np.asarray(rows, dtype=np.int64)].reshape(-1, self.dim)

    def check_identity(self, identity: dict) -> None:
        """Raise ModelMismatchError unless `identity` (the server's) is the model that embedded this gallery."""
        mine = (self.identity.get("model_id"), int(self.identity.get("dim", -1)))
        theirs = (identity.get("model_id"), int(identity.get("dim", -1)))
        if mine != theirs:
            raise ModelMismatchError(
                f"the gallery was embedded by model {mine[0]} (dim {mine[1]}) but the server serves model "
                f"{theirs[0]} (dim {theirs[1]}); embeddings of different models are not comparable - "
                f"re-index the images with this server or point --url at the server that built the gallery"
            )

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(indices (Q, min(k, N)) best first, cosine scores) of the gallery rows nearest each query (Q, D)."""
        q = ops.as_matrix(queries, "queries")
        if q.shape[1] != self.dim:
            raise ModelMismatchError(f"query embeddings have {q.shape[1]} dims, the gallery {self.dim}")
        if len(self) == 0:
            return np.zeros((len(q), 0), np.int64), np.zeros((len(q), 0), np.float32)
        scores = ops.l2_normalize(q) @ self.embeddings.T  # (Q, N)
        idx = ops.topk_indices(scores, k)
        return idx, np.take_along_axis(scores, idx, axis=1)

    # ---- Parquet
    def to_table(self):
        """The gallery as a pyarrow Table with its metadata."""
        import pyarrow as pa

        emb = pa.FixedSizeListArray.from_arrays(pa.array(self.embeddings.ravel(), pa.float32()), self.dim)
        schema = gallery_schema(self.dim, self.identity)
        return pa.Table.from_arrays(
            [pa.array(self.paths, pa.string()), pa.array(self.sha256, pa.string()), pa.array(self.sizes, pa.int64()), emb],
            schema=schema,
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temp file + rename) so an interrupted run never leaves a broken gallery."""
        import pyarrow.parquet as pq

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        pq.write_table(self.to_table(), tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Gallery":
        """Read a gallery written by save(); a file that is not one raises InvalidInputError."""
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (OSError, ValueError) as e:
            raise InvalidInputError(f"cannot read gallery {str(path)!r}: {e}") from None
        meta = (table.schema.metadata or {}).get(META_KEY)
        if meta is None or set(table.column_names) < {"path", "sha256", "size", "embedding"}:
            raise InvalidInputError(f"{str(path)!r} is not a clip-triton gallery (no {META_KEY.decode()} metadata)")
        identity = json.loads(meta)
        if identity.get("format_version") != FORMAT_VERSION:
            raise InvalidInputError(f"{str(path)!r}: unsupported gallery format {identity.get('format_version')}")
        identity.pop("format_version")
        dim = int(identity["dim"])
        emb = table.column("embedding").combine_chunks()
        values = emb.flatten().to_numpy(zero_copy_only=False) if len(emb) else np.zeros((0,), np.float32)
        return cls(
            identity=identity,
            paths=table.column("path").to_pylist(),
            sha256=table.column("sha256").to_pylist(),
            sizes=table.column("size").to_pylist(),
            embeddings=values.astype(np.float32).reshape(-1, dim),
        )


def gallery_schema(dim: int, identity: dict):
    """The Parquet schema of a gallery of `dim`-sized embeddings."""
    import pyarrow as pa

    meta = json.dumps({"format_version": FORMAT_VERSION, **identity, "dim": int(dim)}, sort_keys=True)
    return pa.schema(
        [
            pa.field("path", pa.string(), nullable=False),
            pa.field("sha256", pa.string(), nullable=False),
            pa.field("size", pa.int64(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
        ],
        metadata={META_KEY: meta.encode()},
    )


# ------------------------------------------------------------------------------------------- indexing


def iter_image_files(root: str | os.PathLike, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> Iterator[Path]:
    """Image files under root (recursive, sorted, symlinked folders not followed); root may be a single file."""
    root = Path(root)
    if root.is_file():
        yield root
        return
    exts = {e.lower() for e in extensions}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in exts:
                yield Path(dirpath) / name


_ITEM_HINT = re.compile(r"\bimage (\d+): ")  # the preprocessor names the first bad item of a request


def encode_tolerant(client: Any, items: list[bytes]) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """Embed a batch; when the server rejects it, split it until each bad item is alone and confirmed bad.

    The split uses the server's hint ("image J: ...") when present (3 requests per bad item), else bisects.
    Returns ({index: normalised embedding}, {index: server's message for that item alone}).
    Unavailable servers and timeouts propagate.
    """
    good: dict[int, np.ndarray] = {}
    bad: dict[int, str] = {}

    def go(lo: int, hi: int) -> None:
        if lo >= hi:
            return
        try:
            emb = client.encode_image(items[lo:hi])
        except (InvalidInputError, ServerError) as e:
            if hi - lo == 1:
                bad[lo] = str(e)
                return
            hint = _ITEM_HINT.search(str(e))
            j = lo + int(hint.group(1)) if hint else -1
            cuts = (lo, j, j + 1, hi) if lo <= j < hi else (lo, (lo + hi) // 2, hi)
            for a, b in zip(cuts, cuts[1:]):
                go(a, b)
            return
        for k, e in enumerate(emb):
            good[lo + k] = e

    go(0, len(items))
    return good, bad


@dataclass
class IndexReport:
    """What one index run did."""

    added: int = 0
    known: int = 0  # skipped: content already in the gallery
    pruned: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    total: int = 0  # rows in the gallery afterwards


def index_images(
    client: Any,
    image_dir: str | os.PathLike,
    out: str | os.PathLike,
    batch_size: int | None = None,
    workers: int | None = None,
    checkpoint_every: int = 2048,
    prune: bool = False,
    progress: bool = True,
) -> IndexReport:
    """Embed every new image under image_dir into the Parquet gallery `out` (created or extended).

    Files whose content (sha256) is already in the gallery are skipped; unreadable or undecodable files are
    reported in the result and skipped. The gallery is saved every `checkpoint_every` new rows and at the end.
    """
    from tqdm import tqdm

    info = client.get_model_info()
    out = Path(out)
    gallery = Gallery.load(out) if out.exists() else Gallery(identity=info.identity())
    gallery.check_identity(info.identity())
    report = IndexReport()
    if prune:
        keep = [i for i, p in enumerate(gallery.paths) if Path(p).is_file()]
        report.pruned = len(gallery) - len(keep)
        gallery.take(keep)
    known = set(gallery.sha256)
    batch_size = batch_size or info.max_image_items
    workers = workers or client.max_concurrency
    files = list(iter_image_files(image_dir))
    lock = threading.Lock()
    since_save = 0

    def run_batch(batch: list[tuple[str, str, int, bytes]]) -> tuple[list, dict[int, str]]:
        good, bad = encode_tolerant(client, [b for *_, b in batch])
        return [(batch[i][:3], good[i]) for i in sorted(good)], bad

    def collect(fut: Future, batch: list) -> None:
        nonlocal since_save
        rows, bad = fut.result()
        with lock:
            for i, msg in bad.items():
                report.failed.append((batch[i][0], msg))
                log.warning("skipped %s: %s", batch[i][0], msg)
            if rows:
                gallery.add([r[0][0] for r in rows], [r[0][1] for r in rows], [r[0][2] for r in rows],
                            np.stack([r[1] for r in rows]))
                report.added += len(rows)
                since_save += len(rows)
            if since_save >= checkpoint_every:
                gallery.save(out)
                since_save = 0
        bar.update(len(batch))

    bar = tqdm(total=len(files), unit="img", desc="index", disable=not progress, file=sys.stderr)
    pending: dict[Future, list] = {}
    batch: list[tuple[str, str, int, bytes]] = []
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="clip-index") as pool:

            def submit(b: list) -> None:
                while len(pending) >= workers:  # bound memory: at most `workers` batches in flight
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        collect(f, pending.pop(f))
                pending[pool.submit(run_batch, b)] = b

            for path in files:
                name = str(path.resolve())
                try:
                    data = path.read_bytes()
                except OSError as e:
                    report.failed.append((name, f"cannot read: {e.strerror or e}"))
                    log.warning("skipped %s: cannot read: %s", name, e.strerror or e)
                    bar.update(1)
                    continue
                digest = hashlib.sha256(data).hexdigest()
                if digest in known:
                    report.known += 1
                    bar.update(1)
                    continue
                if not data:
                    report.failed.append((name, "empty file"))
                    log.warning("skipped %s: empty file", name)
                    bar.update(1)
                    continue
                known.add(digest)
                batch.append((name, digest, len(data), data))
                if len(batch) >= batch_size:
                    submit(batch)
                    batch = []
            if batch:
                submit(batch)
            for f in list(pending):
                collect(f, pending.pop(f))
    finally:
        bar.close()
        gallery.save(out)  # keep whatever was embedded, also when the run is interrupted
        report.total = len(gallery)
    return report


def search_gallery(client: Any, gallery: Gallery, text: str | None = None, image: Any = None, k: int = 10):
    """Top-k gallery rows for a text or an image query: list of (path, cosine score), best first."""
    if (text is None) == (image is None):
        raise InvalidInputError("give exactly one of a text query or an image query")
    gallery.check_identity(client.get_model_info().identity())
    query = client.encode_text(text) if text is not None else client.encode_image(image)  # (D,)
    idx, scores = gallery.search(query, k)
    return [(gallery.paths[i], float(s)) for i, s in zip(idx[0], scores[0])]


# ------------------------------------------------------------------------------------------- CLI


COMMAND_HELP = {"index": "index a folder of images into a gallery", "search": "search a gallery by text or image"}


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Arguments of `clip-triton index | search`."""
    if command == "index":
        parser.add_argument("image_dir", help="folder of images (searched recursively) or one image file")
        parser.add_argument("--out", required=True, help="Parquet gallery to create or extend")
        parser.add_argument("--batch-size", type=int, default=None, help="images per request (default: the server's limit)")
        parser.add_argument("--prune", action="store_true", help="drop gallery rows whose file no longer exists")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    elif command == "search":
        parser.add_argument("query", nargs="?", help="text query")
        parser.add_argument("--image", help="image query (a file) instead of a text")
        parser.add_argument("--gallery", required=True, help="Parquet gallery written by `clip-triton index`")
        parser.add_argument("-k", "--top-k", type=int, default=10, help="results to show (default 10)")
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_connection_arguments(parser)


def run(args: argparse.Namespace, command: str) -> int:
    """Run one command; 0 on success, 1 when some inputs failed, 2 on errors."""
    try:
        with connect(args) as client:
            return {"index": _run_index, "search": _run_search}[command](client, args)
    except CLIPClientError as e:
        print(f"clip-triton {command}: error: {e}", file=sys.stderr)
        return 2


def _run_index(client: Any, args: argparse.Namespace) -> int:
    require_pyarrow()
    if not Path(args.image_dir).exists():
        raise InvalidInputError(f"{args.image_dir} does not exist")
    report = index_images(client, args.image_dir, args.out, batch_size=args.batch_size, prune=args.prune,
                          progress=not args.no_progress)
    for path, reason in report.failed:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(f"{args.out}: {report.added} added, {report.known} already indexed, {len(report.failed)} failed, "
          f"{report.pruned} pruned, {report.total} images in the gallery")
    return 1 if report.failed else 0


def _run_search(client: Any, args: argparse.Namespace) -> int:
    require_pyarrow()
    if (args.query is None) == (args.image is None):
        raise InvalidInputError("give a text query or --image PATH (exactly one)")
    gallery = Gallery.load(args.gallery)
    hits = search_gallery(client, gallery, text=args.query, image=args.image, k=args.top_k)
    if args.json:
        print(json.dumps([{"rank": r + 1, "score": s, "path": p} for r, (p, s) in enumerate(hits)], indent=2))
    else:
        for r, (p, s) in enumerate(hits):
            print(f"{r + 1:>3}  {s:.4f}  {p}")
    return 0
