"""The embedded gallery under storage faults, each in a real subprocess: a file size limit or a full disk while the
index grows (PQ codes rewritten, IVF lists appended through a mapping), truncated or damaged files, a hand-edited
manifest, SIGKILL mid-write. Every fault is a GalleryError (CLI exit 2 naming the file), never a signal; committed
rows survive; gallery-check finds damage and --repair rebuilds what derives from the segments."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from clip_client.gallery import Gallery

DIM = 64
CLI = [sys.executable, "-m", "clip_client.cli"]
_SETUP = """
import sys, resource, numpy as np
from clip_client.gallery import Gallery, GalleryError, local
local.TRAIN_AT = 2000
uri = sys.argv[1]
def rows(lo, n):
    x = np.random.default_rng(lo).standard_normal((n, 64)).astype(np.float32)
    return [f"/p/{i}" for i in range(lo, lo + n)], x
"""


def _python(code: str, *args: str, timeout: float = 180, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _SETUP + code, *args], capture_output=True, text=True, timeout=timeout, **kw
    )


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=180)


def _ivf_gallery(uri: Path, n: int = 2500, kind: str = "ivf") -> None:
    """A gallery with an IVF (or PQ) index (trained at 2,000 rows) in folder uri."""
    done = _python(
        f"g = Gallery.create(uri, dim=64, model_id='m', index={kind!r})\n"
        f"for lo in range(0, {n}, 500):\n    g.add(*rows(lo, 500))\ng.close()",
        str(uri),
    )
    assert done.returncode == 0, done.stderr


def _unlisted(uri: Path) -> set[str]:
    """Files under the gallery's folders that its manifest does not name (orphans)."""
    m = json.loads((uri / "gallery.json").read_text())
    named = {f"segments/{s['file']}" for s in m["segments"]} | {f"tombstones/{t}" for t in m["tombstones"]}
    exts = (".faiss",) if m["index"] and m["index"].get("kind") == "pq" else (".faiss", ".ivfdata")
    named |= {f"index/{m['index']['name']}{ext}" for ext in exts} if m["index"] else set()
    return {f"{d}/{f.name}" for d in ("segments", "tombstones", "index") for f in (uri / d).iterdir()} - named


_GROW = """
g = Gallery.open(uri)
limit = int(sys.argv[2]) if len(sys.argv) > 2 else None
if limit:  # bytes any file may hold (Python ignores SIGXFSZ: writes past it fail with EFBIG)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
committed = len(g)
try:
    for lo in range(2500, 2500 + 40 * 500, 500):
        g.add(*rows(lo, 500))
        committed = len(g)
except GalleryError as e:
    print(committed)
    print(e, file=sys.stderr)
    sys.exit(3)
"""


def test_file_size_limit_while_lists_grow_is_a_gallery_error(tmp_path):
    """The lists may not grow (RLIMIT_FSIZE, as a full disk would refuse): the add fails before anything is written
    through the mapping (no SIGBUS), the committed rows stay and no orphan file is left."""
    uri = tmp_path / "g"
    _ivf_gallery(uri)
    done = _python(_GROW, str(uri), str(next((uri / "index").glob("*.ivfdata")).stat().st_size))
    committed = int(done.stdout.split()[0]) if done.returncode == 3 else None
    assert (done.returncode, "no space for the index lists" in done.stderr) == (3, True), done.stderr
    with Gallery.open(uri) as g:
        assert (len(g), g.search(g.embeddings([7]), k=1)[0][0].path) == (committed, "/p/7")
        g.add(*_rows(10_000, 1))  # a writer takes the lock: leftovers of the failed add are removed
    assert _unlisted(uri) == set()


def test_file_size_limit_while_pq_codes_grow_is_a_gallery_error(tmp_path):
    """The PQ codes' file may not grow past the limit: its blocks are reserved before it is written, so the add fails
    with a GalleryError; the committed rows stay, searched through the last complete index, and no orphan is left."""
    uri = tmp_path / "g"
    _ivf_gallery(uri, kind="pq")
    biggest_segment = max(f.stat().st_size for f in (uri / "segments").iterdir())
    done = _python(_GROW, str(uri), str(biggest_segment + 4096))  # segments fit; the codes outgrow them
    committed = int(done.stdout.split()[0]) if done.returncode == 3 else None
    assert (done.returncode, "no space for the index" in done.stderr) == (3, True), done.stderr
    with Gallery.open(uri) as g:
        assert (len(g), g.search(g.embeddings([7]), k=1)[0][0].path) == (committed, "/p/7")
        g.add(*_rows(100_000, 1))
    assert _unlisted(uri) == set()


def _rows(lo: int, n: int):
    x = np.random.default_rng(lo).standard_normal((n, DIM)).astype(np.float32)
    return [f"/p/{i}" for i in range(lo, lo + n)], x


@pytest.mark.parametrize("kind", ["pq", "ivf"])
def test_full_disk_while_the_index_grows_is_a_gallery_error(tmp_path, kind):
    """A real full disk (a small tmpfs): a GalleryError, never SIGBUS."""
    mnt = Path(tempfile.mkdtemp(prefix="clip-gallery-full-"))  # outside tmp_path: pytest never cleans a mount point
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True).returncode:
        mnt.rmdir()
        pytest.skip("cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN): the RLIMIT_FSIZE test covers it")
    try:
        uri = mnt / "g"
        _ivf_gallery(uri, n=2000, kind=kind)
        done = _python(_GROW, str(uri))
        reopened = _python("print(len(Gallery.open(uri)))", str(uri))  # in its own process: nothing stays mapped
        assert (done.returncode, "gallery storage" in done.stderr, reopened.stdout.split()[-1:]) == (
            3,
            True,
            done.stdout.split()[:1],
        ), done.stderr
    finally:
        subprocess.run(["umount", "--lazy", str(mnt)], check=True)
        mnt.rmdir()


def test_truncated_index_lists_are_an_error_naming_the_file(tmp_path):
    uri = tmp_path / "g"
    _ivf_gallery(uri)
    data = next((uri / "index").glob("*.ivfdata"))
    os.truncate(data, data.stat().st_size // 3)
    done = _cli("search", "--like", "/p/5", "--uri", str(uri))
    assert (done.returncode, str(data) in done.stderr, "Traceback" in done.stderr) == (2, True, False), done.stderr


def test_repair_rebuilds_the_index_from_the_segments(tmp_path):
    uri = tmp_path / "g"
    _ivf_gallery(uri)
    before = _cli("search", "--like", "/p/5", "--uri", str(uri), "-k", "3", "--exact").stdout
    data = next((uri / "index").glob("*.ivfdata"))
    os.truncate(data, 4096)
    checked, repaired = _cli("gallery-check", "--uri", str(uri)), _cli("gallery-check", "--uri", str(uri), "--repair")
    found = _cli("search", "--like", "/p/5", "--uri", str(uri), "-k", "3")
    assert (checked.returncode, repaired.returncode, found.returncode, found.stdout) == (1, 0, 0, before)


def test_truncated_pq_codes_are_found_and_rebuilt_from_the_segments(tmp_path):
    """The PQ file is read whole (a short file cannot raise a signal): gallery-check reports it, the next opening
    rebuilds it from the segments, and searches answer as before."""
    uri = tmp_path / "g"
    _ivf_gallery(uri, kind="pq")
    before = _cli("search", "--like", "/p/5", "--uri", str(uri), "-k", "3", "--exact").stdout
    codes = next((uri / "index").glob("pqfs-*.faiss"))
    os.truncate(codes, codes.stat().st_size // 3)
    checked = _cli("gallery-check", "--uri", str(uri))
    found = _cli("search", "--like", "/p/5", "--uri", str(uri), "-k", "3")
    after = _cli("gallery-check", "--uri", str(uri))
    assert (
        checked.returncode,
        f"index file {codes}: missing or truncated" in checked.stdout,
        found.returncode,
        found.stdout,
        after.returncode,
    ) == (1, True, 0, before, 0), (checked.stdout, found.stderr)


def test_garbage_in_pq_codes_is_found_by_its_checksum_and_repaired(tmp_path):
    uri = tmp_path / "g"
    _ivf_gallery(uri, kind="pq")
    before = _cli("search", "--like", "/p/5", "--uri", str(uri), "-k", "3", "--exact").stdout
    codes = next((uri / "index").glob("pqfs-*.faiss"))
    with open(codes, "r+b") as f:  # 4 KB of garbage among the codes, the file's size unchanged
        f.seek(codes.stat().st_size // 2)
        f.write(np.random.default_rng(0).bytes(4096))
    checked, repaired = _cli("gallery-check", "--uri", str(uri)), _cli("gallery-check", "--uri", str(uri), "--repair")
    found = _cli("search", "--like", "/p/5", "--uri", str(uri), "-k", "3")
    assert (
        checked.returncode,
        f"index file {codes}: checksum mismatch" in checked.stdout,
        repaired.returncode,
        found.stdout,
        _cli("gallery-check", "--uri", str(uri)).returncode,
    ) == (1, True, 0, before, 0)


def test_truncated_segment_is_an_error_naming_the_file(tmp_path):
    uri = tmp_path / "g"
    _ivf_gallery(uri, n=1000)
    seg = sorted((uri / "segments").iterdir())[0]
    os.truncate(seg, seg.stat().st_size - 100)
    done = _cli("search", "--like", "/p/5", "--uri", str(uri))
    assert (done.returncode, str(seg) in done.stderr, "Traceback" in done.stderr) == (2, True, False), done.stderr


def test_garbage_in_a_segment_is_found_by_its_checksum(tmp_path):
    uri = tmp_path / "g"
    _ivf_gallery(uri, n=1000)
    seg = sorted((uri / "segments").iterdir())[1]
    with open(seg, "r+b") as f:  # 4 KB of garbage inside the embeddings, the file's size unchanged
        f.seek(seg.stat().st_size // 2)
        f.write(np.random.default_rng(0).bytes(4096))
    done = _cli("gallery-check", "--uri", str(uri))
    assert (done.returncode, f"segment {seg}: checksum mismatch" in done.stdout) == (1, True), done.stdout


def test_hand_edited_manifest_is_refused_and_repaired(tmp_path):
    uri = tmp_path / "g"
    _ivf_gallery(uri, n=1000)
    manifest = json.loads((uri / "gallery.json").read_text())
    manifest["next_id"] = 10  # rows added next would collide with ids 10..999
    (uri / "gallery.json").write_text(json.dumps(manifest))
    refused = _cli("search", "--like", "/p/5", "--uri", str(uri))
    repaired = _cli("gallery-check", "--uri", str(uri), "--repair")
    with Gallery.open(uri) as g:
        g.add(*_rows(5000, 1))
        ids = [r["id"] for r in g.rows()]
    assert (refused.returncode, "next_id 10" in refused.stderr, repaired.returncode, len(set(ids))) == (
        2,
        True,
        0,
        1001,
    )


_KILLED_WRITER = """
g = Gallery.open(uri)
print("ready", flush=True)
lo = 100_000
while True:
    g.add(*rows(lo, 300))
    lo += 300
"""


@pytest.mark.parametrize("kind", ["pq", "ivf"])
def test_sigkill_mid_write_keeps_committed_rows_and_readers_read(tmp_path, kind):
    """A writer killed at arbitrary moments (adds, index retraining) while a reader searches: every reopen sees whole
    batches only, the reader never fails, and the next writer cleans up."""
    uri = tmp_path / "g"
    _ivf_gallery(uri, n=1000, kind=kind)
    seen = []
    for delay in (0.4, 1.1, 2.3):
        proc = subprocess.Popen(
            [sys.executable, "-c", _SETUP + _KILLED_WRITER, str(uri)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.readline().strip() == "ready"
        end = time.monotonic() + delay
        while time.monotonic() < end:
            with Gallery.open(uri) as reader:
                seen.append(len(reader.search(reader.embeddings([3]), k=1)[0]))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    with Gallery.open(uri) as g:
        n = len(g)
        g.add(*_rows(900_000, 1))
        hit = g.search(g.embeddings([3]), k=1)[0][0].path
    assert ((n - 1000) % 300, set(seen), hit, _unlisted(uri)) == (0, {1}, "/p/3", set())
