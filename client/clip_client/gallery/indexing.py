"""Index a folder of images into a gallery: embed what is new or changed, reuse known content, drop what is gone.

One run syncs the gallery with the folder: unchanged files (same path, size and mtime) cost a stat; a file whose
content (sha256) is already in the gallery, e.g. a duplicate or a moved file, gets its own row with the stored
embedding (no server call); rows of files that are gone under the folder are deleted, and so are the rows of the
same content at paths that no longer exist (a file or a whole folder moved elsewhere); a changed file is re-embedded.
With prune=True every row whose path is no longer an existing file (anywhere) is deleted too.
Files the server cannot decode are skipped, reported and remembered with their sha256, so that later runs do not
send that content again, at that path or another one, unless retry_failed=True.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidInputError, ServerError
from .base import Gallery, check_path
from .filters import in_list, quote

log = logging.getLogger("clip_client.gallery")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".npy"})
FLUSH_ROWS = 4096  # rows buffered before one gallery.add (one segment)


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


def image_size(data: bytes) -> tuple[int | None, int | None]:
    """(width, height) from the image's header (or a .npy's shape); (None, None) when unreadable."""
    try:
        if data[:6] == b"\x93NUMPY":
            buf = io.BytesIO(data)
            version = np.lib.format.read_magic(buf)
            shape = np.lib.format._read_array_header(buf, version)[0]  # (H, W, 3)
            return int(shape[1]), int(shape[0])
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            return int(im.width), int(im.height)
    except Exception:  # noqa: BLE001 - any undecodable header: size unknown, the server decides
        return None, None


@dataclass
class IndexReport:
    """What one index run did."""

    added: int = 0  # rows embedded by the server
    copied: int = 0  # rows whose content was already in the gallery (duplicates, moved files): embedding reused
    unchanged: int = 0
    updated: int = 0  # changed files re-embedded (their old rows deleted)
    removed: int = 0  # rows of files that are gone (moved or deleted)
    known_bad: int = 0  # files that failed before and did not change: not sent again
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): could not be embedded now
    total: int = 0  # rows in the gallery afterwards

    def summary(self) -> str:
        """One line for the CLI."""
        return (
            f"{self.added} added, {self.copied} reused (duplicate or moved content), {self.updated} changed, "
            f"{self.removed} removed, {self.unchanged} unchanged, {len(self.skipped)} skipped, "
            f"{self.known_bad} skipped earlier and unchanged, {self.total} images in the gallery"
        )


@dataclass
class _File:
    path: str
    size: int
    mtime: float
    sha256: str = ""
    data: bytes = b""


class _Indexer:
    """One index run's state: buffers rows, asks the gallery for known content, the server for the rest."""

    def __init__(self, client: Any, gallery: Gallery, workers: int, batch_size: int, tags: list[str], bar: Any):
        self.client, self.gallery, self.bar = client, gallery, bar
        self.workers, self.batch_size, self.tags = workers, batch_size, tags
        self.report = IndexReport()
        self.pending: list[_File] = []  # read, not yet embedded
        self.paths: list[str] = []  # rows buffered for gallery.add
        self.vectors: list[np.ndarray] = []
        self.meta: list[dict] = []
        self.failed: list[dict] = []
        self.succeeded: list[str] = []
        self.stale: list[str] = []  # changed files: their old rows go before their new rows are added
        self.seen: set[str] = set()  # sha256 of every file read in this run
        self.elsewhere: set[str] = set()  # paths of stored rows holding content read in this run

    def row(self, f: _File, embedding: np.ndarray) -> None:
        w, h = image_size(f.data)
        self.paths.append(f.path)
        self.vectors.append(embedding)
        self.meta.append(
            {"sha256": f.sha256, "size": f.size, "mtime": f.mtime, "width": w, "height": h, "tags": list(self.tags)}
        )
        self.succeeded.append(f.path)
        if len(self.paths) >= FLUSH_ROWS:
            self.flush_rows()

    def flush_rows(self) -> None:
        if self.stale:
            self.gallery.delete(paths=self.stale)
            self.stale = []
        if self.paths:
            self.gallery.add(self.paths, np.stack(self.vectors), self.meta)
        self.paths, self.vectors, self.meta = [], [], []

    def embed_pending(self) -> None:
        """Embed the pending files: known content from the gallery, one request per new content for the rest."""
        files, self.pending = self.pending, []
        if not files:
            return
        digests = sorted({f.sha256 for f in files})
        known = {}
        for lo in range(0, len(digests), 512):
            for r in self.gallery.rows(filter=in_list("sha256", digests[lo : lo + 512]), fields=("sha256", "path")):
                known.setdefault(r["sha256"], int(r["id"]))
                self.elsewhere.add(r["path"])
        if known:
            order = sorted(known)
            stored = dict(zip(order, self.gallery.embeddings([known[d] for d in order])))
        new = {}
        for f in files:
            if f.sha256 in known:
                self.row(f, stored[f.sha256])
                self.report.copied += 1
            else:
                new.setdefault(f.sha256, []).append(f)
        firsts = [group[0] for group in new.values()]
        chunks = [firsts[lo : lo + self.batch_size] for lo in range(0, len(firsts), self.batch_size)]
        with ThreadPoolExecutor(self.workers, thread_name_prefix="clip-index") as pool:
            for chunk, (good, bad) in zip(
                chunks, pool.map(lambda c: encode_tolerant(self.client, [f.data for f in c]), chunks)
            ):
                for i, f in enumerate(chunk):
                    group = new[f.sha256]
                    if i in good:
                        for g in group:
                            self.row(g, good[i])
                        self.report.added += 1
                        self.report.copied += len(group) - 1
                    else:
                        for g in group:
                            self.fail(g, bad[i])
                    self.bar.update(len(group))

    def fail(self, f: _File, reason: str) -> None:
        self.report.skipped.append((f.path, reason))
        self.failed.append({"path": f.path, "sha256": f.sha256, "size": f.size, "mtime": f.mtime, "reason": reason})
        log.warning("skipped %s: %s", f.path, reason)


def _exists(path: str) -> bool:
    """Whether a stored path is an existing file here."""
    return os.path.isfile(path)


def prune_missing(gallery: Gallery) -> int:
    """Delete the rows (and forget the failures) of paths that are not existing files on this machine; returns how
    many rows were deleted."""
    missing = sorted(p for p in {r["path"] for r in gallery.rows(fields=("path",))} if not _exists(p))
    removed = sum(gallery.delete(paths=missing[lo : lo + 256]) for lo in range(0, len(missing), 256))
    gallery.forget_failures([p for p in gallery.failures() if not _exists(p)])
    return removed


def _existing_rows(gallery: Gallery, root: Path, prefix: str) -> dict[str, list[dict]]:
    """path -> stored rows (path, sha256, size, mtime) of the gallery's rows under root (or of root itself)."""
    pattern = quote(prefix.replace("%", "_") + ("" if root.is_file() else "%"))
    existing: dict[str, list[dict]] = {}
    for r in gallery.rows(filter=f"path like {pattern}", fields=("path", "sha256", "size", "mtime")):
        if r["path"] == prefix or r["path"].startswith(prefix):
            existing.setdefault(r["path"], []).append(r)
    return existing


def _visit(run: _Indexer, path: str, rows: list[dict], bad_content: dict, retry_failed: bool) -> bool:
    """Read one file and queue it for embedding, or count it (unchanged, unreadable, known bad); returns whether it
    was queued (the progress bar is then advanced when it is embedded)."""
    try:
        check_path(path)
    except InvalidInputError as e:  # a file name that is not UTF-8: it cannot be stored (nor recorded)
        run.report.skipped.append((path.encode("utf-8", "backslashreplace").decode(), str(e)))
        return False
    try:
        st = os.stat(path)
        f = _File(path, st.st_size, st.st_mtime)
        if any(r["size"] == f.size and r["mtime"] == f.mtime for r in rows):
            run.report.unchanged += 1
            return False
        with open(path, "rb") as fh:
            f.data = fh.read()
    except OSError as e:
        run.fail(_File(path, -1, -1.0), f"cannot read: {e.strerror or e}")
        return False
    f.sha256 = hashlib.sha256(f.data).hexdigest()
    run.seen.add(f.sha256)
    if rows:
        run.stale.append(path)
        run.report.updated += 1
    before = bad_content.get(f.sha256)
    if not f.data:
        run.fail(f, "empty file")
    elif before and not retry_failed:  # this content failed before (at this path or another one)
        run.report.known_bad += 1
        run.failed.append({**before, "path": path, "size": f.size, "mtime": f.mtime})
    else:
        run.pending.append(f)
        if len(run.pending) >= run.batch_size * run.workers:
            run.embed_pending()
        return True
    return False


def _finish(run: _Indexer, gallery: Gallery, files: list[str], existing: dict, failures: dict, prefix: str) -> None:
    """Keep what was embedded, delete the rows of files that are gone, record and forget failures."""
    run.flush_rows()  # keep whatever was embedded, also when the run is interrupted
    on_disk = set(files)
    # under the folder: rows of files that are gone; elsewhere: rows of content found here whose file is gone
    gone = sorted(
        {p for p in existing if p not in on_disk}
        | {p for p in run.elsewhere if p not in on_disk and not p.startswith(prefix) and not _exists(p)}
    )
    run.report.removed = sum(gallery.delete(paths=gone[lo : lo + 256]) for lo in range(0, len(gone), 256))
    gallery.record_failures(run.failed)
    done = set(run.succeeded)
    gallery.forget_failures(
        [
            p
            for p, v in failures.items()
            if p in done
            or (p not in on_disk and (p.startswith(prefix) or (v.get("sha256") in run.seen and not _exists(p))))
        ]
    )
    run.report.total = len(gallery)


def index_folder(
    client: Any,
    gallery: Gallery,
    root: str | os.PathLike,
    batch_size: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    retry_failed: bool = False,
    tags: list[str] | None = None,
    prune: bool = False,
) -> IndexReport:
    """Sync `gallery` with the images under `root` (a folder or one file) using `client` to embed; see the module.
    batch_size: images per request (None or 0: the server's limit)."""
    from tqdm import tqdm

    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0):
        raise InvalidInputError(f"batch_size must be an int >= 0 (0: the server's limit), got {batch_size!r}")
    info = client.get_model_info()
    gallery.check_identity(info)
    root = Path(root).absolute()
    if not root.exists():
        raise InvalidInputError(f"{root} does not exist")
    prefix = str(root) if root.is_file() else str(root).rstrip(os.sep) + os.sep
    files = [str(p) for p in iter_image_files(root)]
    existing = _existing_rows(gallery, root, prefix)
    failures = gallery.failures()
    bad_content = {v["sha256"]: v for v in failures.values() if v.get("sha256")}
    bar = tqdm(total=len(files), unit="img", desc="index", disable=not progress, file=sys.stderr)
    run = _Indexer(
        client, gallery, workers or client.max_concurrency, batch_size or info.max_image_items, tags or [], bar
    )
    try:
        for path in files:
            if not _visit(run, path, existing.get(path, []), bad_content, retry_failed):
                bar.update(1)
        run.embed_pending()
    finally:
        bar.close()
        _finish(run, gallery, files, existing, failures, prefix)
    if prune:
        run.report.removed += prune_missing(gallery)
        run.report.total = len(gallery)
    return run.report
