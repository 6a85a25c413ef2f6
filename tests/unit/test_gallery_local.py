"""The embedded gallery's own promises: IVF recall against exact search, O(batch) adds (no file rewritten),
reopening in a new process, compaction, crash recovery, the write lock, and the filter language."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from clip_client.errors import InvalidInputError
from clip_client.gallery import FilterError, Gallery, GalleryError, filters, local

DIM = 32


def _clustered(n: int, seed: int = 0, clusters: int = 60) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, DIM)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture()
def small_ivf(monkeypatch):
    """Train the index (PQ or IVF) at 3,000 rows instead of TRAIN_AT."""
    monkeypatch.setattr(local, "TRAIN_AT", 3000)


KINDS = pytest.mark.parametrize("kind", ["pq", "ivf"])


def _recall(g, x: np.ndarray, queries: np.ndarray, k: int = 10, ids=None) -> float:
    ids = np.arange(len(x)) if ids is None else np.asarray(ids)
    exact = ids[np.argsort(-(queries @ x[ids].T), axis=1)[:, :k]]
    found = [{int(h.path.split("/")[-1]) for h in row} for row in g.search(queries, k=k)]
    return float(np.mean([len(f & set(e.tolist())) / k for f, e in zip(found, exact)]))


def test_ivf_recall_reopen_and_incremental_files(tmp_path, small_ivf):
    x = _clustered(8000)
    queries = _clustered(50, seed=1)
    uri = tmp_path / "g"
    g = Gallery.create(uri, dim=DIM, model_id="m", index="ivf")
    g.add([f"/p/{i}" for i in range(2000)], x[:2000])
    assert g.manifest["index"] is None  # exact below TRAIN_AT
    assert _recall(g, x[:2000], queries) == 1.0
    g.add([f"/p/{i}" for i in range(2000, 4000)], x[2000:4000])
    entry = g.manifest["index"]
    assert entry is not None and entry["nlist"] == local.nlist_for(entry["sized_for"]) and entry["trained_on"] == 4000
    header, data = (uri / "index" / f"{entry['name']}{ext}" for ext in (".faiss", ".ivfdata"))

    # later adds append: no existing segment or list file is rewritten
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (uri / "segments").iterdir()}
    lists_inode = data.stat().st_ino
    for lo in range(4000, 8000, 1000):
        g.add([f"/p/{i}" for i in range(lo, lo + 1000)], x[lo : lo + 1000])
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (uri / "segments").iterdir()}
    assert all(after[name] == v for name, v in before.items()) and len(after) == len(before) + 4
    assert data.stat().st_ino == lists_inode and header.exists()
    assert len(g) == 8000 and _recall(g, x, queries) >= 0.95

    # a filter keeping few rows still finds the exact top-k among them (scans more lists)
    keep = np.arange(0, 8000, 97)
    g.delete(filter=f"path not in {json.dumps([f'/p/{i}' for i in keep])}")
    assert len(g) == len(keep) and _recall(g, x, queries, ids=keep) >= 0.95
    g.close()

    # a new process opens it (memory-mapped lists) and gets the same answers
    code = (
        "import json, sys, numpy as np; from clip_client.gallery import Gallery; g = Gallery.open(sys.argv[1]); "
        "q = np.array(json.loads(sys.argv[2]), np.float32); "
        "print(json.dumps([[h.path for h in row] for row in g.search(q, k=5)]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(uri), json.dumps(queries[:3].tolist())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    g = Gallery.open(uri)
    assert json.loads(out.stdout) == [[h.path for h in row] for row in g.search(queries[:3], k=5)]
    assert "resizing" not in out.stdout and "ONDISK" not in out.stdout  # FAISS' printf kept off stdout

    # optimize: one segment without the deleted rows, retrained index in new files
    g.optimize(retrain=True)
    assert len(list((uri / "segments").iterdir())) == 1 and not list((uri / "tombstones").iterdir())
    assert not header.exists() and not data.exists() and len(g) == len(keep)
    assert _recall(g, x, queries, ids=keep) >= 0.95
    g.close()


def test_pq_recall_reopen_deletes_filters_and_retrain(tmp_path, small_ivf):
    """The default index: PQ fast-scan codes of every row in one checksummed file, rewritten whole by each add (no
    segment rewritten); deleted and filtered-out rows never returned; the same answers after a reopen."""
    x = _clustered(8000)
    queries = _clustered(50, seed=1)
    uri = tmp_path / "g"
    g = Gallery.create(uri, dim=DIM, model_id="m")
    g.add([f"/p/{i}" for i in range(4000)], x[:4000])
    entry = dict(g.manifest["index"])
    path = uri / "index" / f"{entry['name']}.faiss"
    assert (entry["kind"], entry["m"], entry["trained_on"], sorted(os.listdir(uri / "index"))) == (
        "pq",
        local.pq_m_for(DIM),
        4000,
        [path.name],
    )
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (uri / "segments").iterdir()}
    for lo in range(4000, 8000, 1000):
        g.add([f"/p/{i}" for i in range(lo, lo + 1000)], x[lo : lo + 1000])
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (uri / "segments").iterdir()}
    assert all(after[name] == v for name, v in before.items()) and len(after) == len(before) + 4
    assert (g.manifest["index"]["ntotal"], g.manifest["index"]["bytes"], g.manifest["index"]["header_crc"]) == (
        8000,
        path.stat().st_size,
        local._crc32(path),
    )
    assert len(g) == 8000 and _recall(g, x, queries) >= 0.95
    keep = np.arange(0, 8000, 97)  # a filter keeping few rows: exact among them
    assert _recall_with_filter(g, x, queries, keep) == 1.0
    g.delete(filter=f"path not in {json.dumps([f'/p/{i}' for i in keep[::2]])}")
    assert len(g) == len(keep[::2]) and _recall(g, x, queries, ids=keep[::2]) == 1.0
    g.close()
    g = Gallery.open(uri)
    assert _recall(g, x, queries, ids=keep[::2]) == 1.0
    g.optimize(retrain=True)  # fewer rows than the PQ index was trained on: exact again
    assert g.manifest["index"] is None and not list((uri / "index").iterdir())
    g.close()


def _recall_with_filter(g, x: np.ndarray, queries: np.ndarray, keep: np.ndarray, k: int = 10) -> float:
    exact = keep[np.argsort(-(queries @ x[keep].T), axis=1)[:, :k]]
    flt = f"path in {json.dumps([f'/p/{i}' for i in keep])}"
    found = [{int(h.path.split("/")[-1]) for h in row} for row in g.search(queries, k=k, filter=flt)]
    return float(np.mean([len(f & set(e.tolist())) / k for f, e in zip(found, exact)]))


def test_pq_filter_keeping_many_rows_drops_the_others(tmp_path, small_ivf):
    """A filter keeping half the rows is answered from the PQ candidates (widened), never with a filtered-out row."""
    x = _clustered(4000)
    queries = _clustered(30, seed=1)
    g = Gallery.create(tmp_path / "g", dim=DIM, model_id="m")
    g.add([f"/p/{i}" for i in range(4000)], x)
    keep = np.arange(0, 4000, 2)
    flt = f"path in {json.dumps([f'/p/{i}' for i in keep])}"
    found = {int(h.path.split("/")[-1]) for row in g.search(queries, k=10, filter=flt) for h in row}
    recall = _recall_with_filter(g, x, queries, keep)
    g.close()
    assert (found <= set(keep.tolist()), recall >= 0.95) == (True, True)


def test_index_kind_is_checked_and_switchable(tmp_path, small_ivf):
    x = _clustered(3500)
    with pytest.raises(InvalidInputError, match="index must be one of pq, ivf"):
        Gallery.create(tmp_path / "bad", dim=DIM, model_id="m", index="hnsw")
    with pytest.raises(InvalidInputError, match="pq_m must be a positive divisor"):
        Gallery.create(tmp_path / "bad2", dim=DIM, model_id="m", pq_m=7)
    g = Gallery.create(tmp_path / "g", dim=DIM, model_id="m", pq_m=4)
    g.add([f"/p/{i}" for i in range(3500)], x)
    first = (g.manifest["index"]["kind"], g.manifest["index"]["m"], g.info()["index"])
    g.optimize(index="ivf")
    second = (g.manifest["index"]["kind"], g.info()["index_kind"], g.search(x[42], k=1)[0][0].path)
    g.close()
    assert (first, second) == (("pq", 4, "PQ4x4 fast-scan (every row) + exact re-rank"), ("ivf", "ivf", "/p/42"))


def test_small_segments_are_merged_and_ids_stay(tmp_path, monkeypatch):
    monkeypatch.setattr(local, "MAX_SMALL_SEGMENTS", 4)
    x = _clustered(60)
    g = Gallery.create(tmp_path / "g", dim=DIM, model_id="m")
    for lo in range(0, 60, 10):
        g.add([f"/p/{i}" for i in range(lo, lo + 10)], x[lo : lo + 10])
    assert len(g.manifest["segments"]) <= 4 and len(g) == 60
    ids = {r["path"]: r["id"] for r in g.rows()}
    g.close()
    g = Gallery.open(tmp_path / "g")
    assert {r["path"]: r["id"] for r in g.rows()} == ids and g.search(x[17], k=1)[0][0].path == "/p/17"
    # optimize() drops deleted rows from the files and from the index: they are never found again
    assert g.delete(filter='path in ["/p/17", "/p/18"]') == 2
    g.optimize()
    assert not list((tmp_path / "g" / "tombstones").iterdir()) and len(g) == 58
    found = {h.path for h in g.search(x, k=3)[17] + g.search(x, k=60)[0]}
    assert "/p/17" not in found and "/p/18" not in found and len(found) == 58
    g.close()
    assert len(Gallery.open(tmp_path / "g")) == 58


@KINDS
def test_index_that_disagrees_with_the_segments_is_rebuilt(tmp_path, small_ivf, caplog, kind):
    x = _clustered(4000)
    uri = tmp_path / "g"
    g = Gallery.create(uri, dim=DIM, model_id="m", index=kind)
    g.add([f"/p/{i}" for i in range(4000)], x)
    entry = g.manifest["index"]
    g.close()
    (uri / "index" / f"{entry['name']}.faiss").write_bytes(b"torn write")
    g = Gallery.open(uri)
    assert "rebuilding" in caplog.text and len(g) == 4000 and g.search(x[123], k=1)[0][0].path == "/p/123"
    g.close()


def test_one_writer_at_a_time(tmp_path):
    x = _clustered(4)
    a = Gallery.create(tmp_path / "g", dim=DIM, model_id="m")
    a.add(["/p/0"], x[:1])
    b = Gallery.open(tmp_path / "g")
    with pytest.raises(local.GalleryLockedError):
        b.add(["/p/1"], x[1:2])
    a.close()
    b.add(["/p/1"], x[1:2])
    assert len(b) == 2


@KINDS
def test_writers_opened_before_each_other_lose_nothing(tmp_path, small_ivf, kind):
    """Each writer reloads what the others committed when it takes the lock: rows, deletes and compaction survive,
    no segment file name is reused; on the flat index and on the PQ / IVF index alike."""
    x = _clustered(3300)
    uri = tmp_path / "g"
    Gallery.create(uri, dim=DIM, model_id="m", index=kind).close()
    a, b, c = Gallery.open(uri), Gallery.open(uri), Gallery.open(uri)
    a.add(["/p/0", "/p/1"], x[:2])
    a.close()
    b.add(["/p/2"], x[2:3])
    b.close()
    assert c.delete(paths="/p/0") == 1  # a row c never saw
    c.close()
    d, e = Gallery.open(uri), Gallery.open(uri)
    d.add([f"/p/{i}" for i in range(3, 3300)], x[3:3300])  # trains the IVF index
    d.close()
    e.optimize(retrain=True)
    e.add(["/p/3300"], _clustered(1, seed=9))
    e.close()
    g = Gallery.open(uri)
    assert sorted(int(r["path"][3:]) for r in g.rows()) == list(range(1, 3301))
    assert g.manifest["index"] is not None and g.search(x[1234], k=1)[0][0].path == "/p/1234"
    assert len({s["file"] for s in g.manifest["segments"]}) == len(g.manifest["segments"])
    assert sorted(os.listdir(uri / "segments")) == sorted(s["file"] for s in g.manifest["segments"])
    g.close()


_WRITER = """
import sys, time
import numpy as np
from clip_client.gallery import Gallery, local
uri, me = sys.argv[1], int(sys.argv[2])
for i in range(20):
    g = Gallery.open(uri)  # opened before the others' writes: its add must not overwrite them
    while True:
        try:
            g.add([f"/w{me}/{i}"], np.random.default_rng(i).random((1, 32)))
            break
        except local.GalleryLockedError:
            time.sleep(0.001)
    g.close()
"""


def test_concurrent_writer_processes_lose_nothing(tmp_path):
    uri = tmp_path / "g"
    Gallery.create(uri, dim=DIM, model_id="m").close()
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(uri), str(w)]) for w in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    with Gallery.open(uri) as g:
        assert sorted(r["path"] for r in g.rows()) == sorted(f"/w{w}/{i}" for w in range(3) for i in range(20))


def test_storage_errors_are_gallery_errors(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(GalleryError, match="Not a directory"):
        Gallery.create(tmp_path / "file.txt" / "g", dim=DIM, model_id="m")
    g = Gallery.create(tmp_path / "g", dim=DIM, model_id="m")
    os.rmdir(tmp_path / "g" / "segments")
    (tmp_path / "g" / "segments").write_text("not a folder")  # a write that fails like a read-only folder would
    with pytest.raises(GalleryError, match="gallery storage"):
        g.add(["/p/0"], _clustered(1))
    g.close()
    with pytest.raises(TypeError, match="bytes"):
        Gallery.create(os.fsencode(tmp_path / "b"), dim=DIM, model_id="m")
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob("b'*"))


def test_cli_refuses_negative_batch_size(capsys):
    from clip_client.cli import main

    with pytest.raises(SystemExit) as e:
        main(["index", "photos", "--batch-size", "-3"])
    assert e.value.code == 2 and "must be an int >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["index", "--help"])
    assert "0: the server's limit" in capsys.readouterr().out


def test_old_single_file_gallery_is_refused_with_a_hint(tmp_path):
    old = tmp_path / "gallery.parquet"
    old.write_bytes(b"PAR1")
    with pytest.raises(Exception, match="older clip-triton"):
        Gallery.open(old)
    with pytest.raises(Exception, match="not an empty folder"):
        Gallery.create(old, dim=DIM, model_id="m")


# ------------------------------------------------------------------------------------------------ filters
def _table() -> pa.Table:
    return pa.table(
        {
            "path": ["/a/x_1.jpg", "/a/y.jpg", "/b/'q'.png", "/b/z%.jpg"],
            "sha256": ["", "", "", ""],
            "size": pa.array([10, 200, 3000, -1], pa.int64()),
            "width": pa.array([1, 2, 3, 4], pa.int64()),
            "height": pa.array([1, 2, 3, 4], pa.int64()),
            "mtime": [1.5, 2.5, 3.5, -1.0],
            "tags": [["cat", "pet"], ["dog"], [], ["cat"]],
            "meta": ['{"camera": "X", "n": 1}', '{"camera": "Y", "n": 2.5}', "{}", '{"n": "text"}'],
        }
    )


@pytest.mark.parametrize(
    "expr, rows",
    [
        ("size > 100", [1, 2]),
        ("100 < size", [1, 2]),
        ("size >= 10 && size <= 200", [0, 1]),
        ("size == 10 || !(size != 3000)", [0, 2]),
        ("not size in [10, 200]", [2, 3]),
        ("size not in [10, 200]", [2, 3]),
        ('path like "/a/%"', [0, 1]),
        ('path like "/a/_.jpg"', [1]),  # _ is one character
        ('path == "/a/y\\u002ejpg"', [1]),
        ('path like "/a/x_1%"', [0]),
        ("path == \"/b/'q'.png\"", [2]),
        ("path == '/b/\\'q\\'.png'", [2]),
        ("mtime < 3 AND mtime > 0", [0, 1]),
        ('array_contains(tags, "cat")', [0, 3]),
        ('array_contains_any(tags, ["dog", "pet"])', [0, 1]),
        ('array_contains_all(tags, ["cat", "pet"])', [0]),
        ("array_length(tags) == 0", [2]),
        ('meta["camera"] == "X"', [0]),
        ('meta["n"] > 1', [1]),  # a str value is not comparable with a number: false, not an error
        ('meta["n"] in [1, "text"]', [0, 3]),
        ('meta["camera"] like "%"', [0, 1]),
        ('meta["missing"] == 1', []),
    ],
)
def test_filter_expressions(expr, rows):
    mask = filters.evaluate(filters.parse(expr), _table())
    assert np.flatnonzero(mask).tolist() == rows


@pytest.mark.parametrize(
    "expr, message",
    [
        ("", "non-empty"),
        ("size >", "expected"),
        ("size > 1 and", "expected"),
        ("(size > 1", "expected"),
        ("colour == 1", "unknown column"),
        ("id == 1", "unknown column"),
        ("size == path", "literal"),
        ('size == "big"', "type"),
        ('upper(path) == "A"', "unknown function"),
        ("array_contains(path, 1)", "applies to tags"),
        ("size ~ 3", "cannot read"),
        ("size > 1 size", "unexpected"),
        ("meta[1] == 2", "string key"),
        ("tags in [1]", "tags is a list"),
        ('tags in ["x"]', "tags is a list"),
        ('array_length(tags) like "x"', "type"),
        ('size like "1%"', "type"),
        ('path in ["a", 1]', "type"),
        ("mtime == true", "type"),
        ("array_contains(tags, 1)", "string tags"),
        ("not " * 3000 + "size > 1", "nested"),
        ("(" * 3000 + "size > 1" + ")" * 3000, "nested"),
        ('path like "\\ud800"', "surrogate"),
        ("size > 100000000000000000000000", "out of range"),
        ("size > 1 or " * 1_000_000 + "size > 1", "longer than"),
    ],
)
def test_filter_errors(expr, message):
    with pytest.raises(FilterError, match=message):
        filters.evaluate(filters.parse(expr), _table())


def test_long_filters_and_quoted_literals():
    table = _table()
    many = " or ".join(["size == 10"] * 5000)  # n-ary and/or: no recursion per term
    assert np.flatnonzero(filters.evaluate(filters.parse(many), table)).tolist() == [0]
    assert np.flatnonzero(
        filters.evaluate(filters.parse('path == "\\ud83d\\ude00"'), pa.table({"path": ["\U0001f600", "x"]}))
    ).tolist() == [0]  # an escaped surrogate pair is one character
    odd = ['caf\u00e9 "q" \\ \n\r\t \x01 \U0001f600', "/b/'q'.png"]
    tree = filters.parse(filters.in_list("path", odd))
    assert tree == ("in", ("col", "path"), odd, False)


# ---------------------------------------------------------------------------------------------- CLIP geometry
def _clip_like(rows: int, dim: int = 128, concept_size: int = 40, queries: int = 60):
    """Gallery images and queries with CLIP's geometry (bench-retrieval's generator): image-image cosine ~0.87 within
    a concept, ~0.56 across; text queries ~0.34 with their concept's images, ~0.03 with others."""
    from clip_loadtest.retrieval import ClipLike

    gen = ClipLike(dim, rows // concept_size, seed=3)
    rng = np.random.default_rng(4)
    x = gen.images(rows, 5)
    return x, gen.texts(rng.integers(0, gen.concepts, queries), 6), gen.images(queries, 7)


def _recall_against_exact(g, x: np.ndarray, q: np.ndarray, k: int = 10, **kw) -> float:
    exact = np.argsort(-(q @ x.T), axis=1)[:, :k]
    found = [{int(h.path.split("/")[-1]) for h in row} for row in g.search(q, k=k, **kw)]
    return float(np.mean([len(f & set(e.tolist())) / k for f, e in zip(found, exact)]))


@KINDS
def test_text_like_queries_keep_their_recall(tmp_path, small_ivf, kind):
    """Text queries are out of distribution for an index trained on images: the operating point calibrated after the
    training (OOD-like probes) keeps their recall, and it is persisted."""
    x, text, image = _clip_like(6000)
    g = Gallery.create(tmp_path / "g", dim=x.shape[1], model_id="m", index=kind)
    g.add([f"/p/{i}" for i in range(6000)], x)
    op = g.manifest["index"]["operating_point"]
    assert _recall_against_exact(g, x, text) >= 0.95 and _recall_against_exact(g, x, image) >= 0.97
    assert op["recall"] >= local.TUNE_TARGET and op["queries"].startswith("gallery probes")
    g.close()
    with Gallery.open(tmp_path / "g") as g:
        assert (g.rerank, g.info()["operating_point"]) == (op["rerank"], op)


@KINDS
def test_exact_search_scores_every_row(tmp_path, small_ivf, kind):
    x, text, _ = _clip_like(4000)
    g = Gallery.create(tmp_path / "g", dim=x.shape[1], model_id="m", index=kind)
    g.add([f"/p/{i}" for i in range(4000)], x)
    g.nprobe, g.rerank = 1, 1  # the index alone would miss rows
    assert _recall_against_exact(g, x, text, exact=True) == 1.0
    g.close()


@KINDS
def test_tune_measures_given_then_recent_queries(tmp_path, small_ivf, kind):
    x, text, _ = _clip_like(4000)
    g = Gallery.create(tmp_path / "g", dim=x.shape[1], model_id="m", index=kind)
    g.add([f"/p/{i}" for i in range(4000)], x)
    given = g.tune(text, target_recall=0.99)
    for q in text[:40]:
        g.search(q)
    recent = g.tune()
    g.close()
    assert (given["queries"], given["recall"] >= 0.99, recent["queries"], recent["n_queries"]) == (
        "given",
        True,
        "recent",
        40,
    )


def test_index_is_retrained_as_the_gallery_grows(tmp_path, small_ivf):
    x, _, _ = _clip_like(13000, dim=32)
    g = Gallery.create(tmp_path / "g", dim=32, model_id="m", expected_rows=1_000_000, index="ivf")
    g.add([f"/p/{i}" for i in range(3000)], x[:3000])
    first = dict(g.manifest["index"])
    for lo in range(3000, 13000, 2000):
        g.add([f"/p/{i}" for i in range(lo, lo + 2000)], x[lo : lo + 2000])
    last = g.manifest["index"]
    g.close()
    assert (first["trained_on"], last["trained_on"], last["nlist"] > first["nlist"]) == (3000, 13000, True)


def test_pq_codebooks_are_retrained_as_the_gallery_grows(tmp_path, small_ivf):
    x, _, _ = _clip_like(13000, dim=32)
    g = Gallery.create(tmp_path / "g", dim=32, model_id="m")
    g.add([f"/p/{i}" for i in range(3000)], x[:3000])
    first = dict(g.manifest["index"])
    for lo in range(3000, 13000, 2000):
        g.add([f"/p/{i}" for i in range(lo, lo + 2000)], x[lo : lo + 2000])
    last = g.manifest["index"]
    files = os.listdir(tmp_path / "g" / "index")
    g.close()
    assert (first["trained_on"], last["trained_on"], last["name"] != first["name"], files) == (
        3000,
        13000,
        True,
        [f"{last['name']}.faiss"],
    )  # retrained at 4x; the old codes' file removed


def test_hand_edited_manifest_is_refused(tmp_path):
    g = Gallery.create(tmp_path / "g", dim=DIM, model_id="m")
    g.add([f"/p/{i}" for i in range(10)], _clustered(10))
    g.close()
    manifest = json.loads((tmp_path / "g" / "gallery.json").read_text())
    manifest["next_id"] = 3  # new rows would reuse ids 3..9
    (tmp_path / "g" / "gallery.json").write_text(json.dumps(manifest))
    with pytest.raises(GalleryError, match="next_id 3 but the segments hold ids up to 9"):
        Gallery.open(tmp_path / "g")


def test_gallery_info_tune_and_exact_through_the_cli(tmp_path, small_ivf, capsys):
    from clip_client.cli import main

    x, _, _ = _clip_like(4000)
    with Gallery.create(tmp_path / "g", dim=x.shape[1], model_id="m") as g:
        g.add([f"/p/{i}" for i in range(4000)], x)
    assert main(["gallery-info", "--uri", str(tmp_path / "g"), "--tune", "--target-recall", "0.99", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert main(["search", "--like", "/p/7", "--uri", str(tmp_path / "g"), "--exact", "-k", "1"]) == 0
    first = capsys.readouterr().out.split()
    op = info["operating_point"]
    assert (
        info["rows"],
        info["index_kind"],
        op["target"],
        op["recall"] >= 0.99,
        info["rerank"] == op["rerank"],
        first[-1],
    ) == (4000, "pq", 0.99, True, True, f"/p/{int(np.argsort(-(x @ x[7]))[1])}")  # the nearest other image
