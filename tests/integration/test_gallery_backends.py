"""One Gallery API, two engines: every behaviour checked on the embedded index and on Milvus (milvus-lite, the
embedded Milvus that speaks the server's API), against exact numpy search."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from clip_client import InvalidInputError, ModelMismatchError
from clip_client.gallery import FilterError, Gallery

DIM = 16


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(params=["local", "milvus-lite"])
def uri(request, tmp_path):
    """A fresh gallery URI for each backend."""
    if request.param == "milvus-lite":
        pytest.importorskip("milvus_lite")
        return str(tmp_path / "milvus.db") + "?collection=photos"
    return str(tmp_path / "gallery")


def _meta(i: int) -> dict:
    return {
        "sha256": f"{i:064x}",
        "size": 1000 * i,
        "width": 64 + i,
        "height": 48,
        "mtime": 1.7e9 + i,
        "tags": ["cat"] if i % 3 == 0 else ["dog", "outdoor"] if i % 3 == 1 else [],
        "camera": "X100" if i % 2 else "Z5",
        "rating": i % 5,
    }


def test_add_search_filter_delete_reopen(uri):
    x = _vectors(60)
    paths = [f"/photos/{'a' if i < 30 else 'b'}/img{i:02d}.jpg" for i in range(60)]
    g = Gallery.create(uri, dim=DIM, model_id="model-a", logit_scale=4.6)
    g.add(paths[:40], x[:40], [_meta(i) for i in range(40)])
    g.add(paths[40:], x[40:] * 3.0, [_meta(i) for i in range(40, 60)])  # stored normalised
    assert len(g) == 60 and g.dim == DIM and g.model_id == "model-a"

    queries = _vectors(5, seed=1)
    exact = np.argsort(-(queries @ x.T), axis=1, kind="stable")[:, :7]
    hits = g.search(queries, k=7)
    assert len(hits) == 5 and all(len(h) == 7 for h in hits)
    for q, row in enumerate(hits):
        assert [h.path for h in row] == [paths[i] for i in exact[q]]
        assert [h.score for h in row] == pytest.approx([float(queries[q] @ x[i]) for i in exact[q]], abs=1e-5)
    best = g.search(x[7], k=1)[0][0]  # a (D,) query works too
    assert best.path == paths[7] and best.score == pytest.approx(1.0, abs=1e-5)
    assert (best.sha256, best.size, best.width, best.height, best.tags) == (
        f"{7:064x}",
        7000,
        71,
        48,
        ["dog", "outdoor"],
    )
    assert best.mtime == pytest.approx(1.7e9 + 7) and best.metadata == {"camera": "X100", "rating": 2}

    # filters: the same expression language on both engines
    def filtered(expr: str) -> list[int]:
        found = g.search(queries[:1], k=60, filter=expr)[0]
        return sorted(int(h.path[-6:-4]) for h in found)

    assert filtered('array_contains(tags, "cat")') == [i for i in range(60) if i % 3 == 0]
    assert filtered('array_contains_any(tags, ["cat", "outdoor"]) and size >= 30000') == [
        i for i in range(30, 60) if i % 3 != 2
    ]
    assert filtered('meta["camera"] == "X100" and meta["rating"] >= 3') == [
        i for i in range(60) if i % 2 and i % 5 >= 3
    ]
    assert filtered('path like "/photos/b/%" and not (width in [95, 96])') == [
        i for i in range(30, 60) if i not in (31, 32)
    ]
    assert filtered("size > 1e9") == []
    with pytest.raises(FilterError):
        g.search(queries[:1], k=3, filter="embedding > 1")
    with pytest.raises(FilterError):
        g.search(queries[:1], k=3, filter="size >")

    # rows, stored embeddings, similar-to-a-stored-image
    rows = g.rows(filter='path like "/photos/a/%"', fields=("path", "size"))
    assert sorted(r["path"] for r in rows) == paths[:30] and all(set(r) == {"id", "path", "size"} for r in rows)
    stored = g.embeddings([r["id"] for r in rows[:3]])
    assert np.allclose(stored, x[[int(r["path"][-6:-4]) for r in rows[:3]]], atol=1e-6)
    assert g.similar(paths[12], k=2)[0].path == paths[12]

    # deletes by path and by filter; duplicate paths are separate rows
    g.add([paths[5]], x[5:6], [{"tags": ["copy"]}])
    assert len(g.find([paths[5]])[paths[5]]) == 2
    assert g.delete(paths=[paths[5], paths[6]]) == 3
    assert g.delete(filter='array_contains(tags, "cat") and size < 9000') == 2  # 0 and 3 (6 is gone already)
    gone = {paths[i] for i in (0, 3, 5, 6)}
    assert len(g) == 56 and not gone & {h.path for h in g.search(queries, k=60)[0]}
    g.close()

    # reopen: same rows, same answers, identity kept
    g = Gallery.open(uri)
    assert len(g) == 56 and g.model_id == "model-a" and g.identity["logit_scale"] == pytest.approx(4.6)
    again = g.search(queries, k=5)
    keep = [i for i in range(60) if paths[i] not in gone]
    exact = np.argsort(-(queries @ x[keep].T), axis=1, kind="stable")[:, :5]
    assert [[h.path for h in row] for row in again] == [[paths[keep[i]] for i in r] for r in exact]
    g.close()


def test_identity_and_input_errors(uri):
    g = Gallery.create(uri, dim=DIM, model_id="model-a")
    with pytest.raises(ModelMismatchError, match="re-index"):
        g.check_identity({"model_id": "model-b", "dim": DIM})
    g.check_identity({"model_id": "model-a", "dim": DIM})
    with pytest.raises(ModelMismatchError):
        g.add(["/a.jpg"], np.ones((1, DIM + 1), np.float32))
    with pytest.raises(ModelMismatchError):
        g.search(np.ones((1, DIM + 1), np.float32))
    with pytest.raises(InvalidInputError):
        g.add(["/a.jpg", "/b.jpg"], np.ones((1, DIM), np.float32))
    with pytest.raises(InvalidInputError):
        g.add(["/a.jpg"], np.full((1, DIM), np.nan, np.float32))
    with pytest.raises(InvalidInputError):
        g.add(["/a.jpg"], np.ones((1, DIM), np.float32), [{"tags": "cat"}])
    with pytest.raises(InvalidInputError):
        g.add(["/a.jpg"], np.ones((1, DIM), np.float32), [{"size": -5}])
    with pytest.raises(InvalidInputError):
        g.search(np.ones(DIM, np.float32), k=0)
    assert len(g) == 0 and g.search(np.ones((2, DIM), np.float32), k=3) == [[], []]
    g.close()
    with pytest.raises(InvalidInputError):  # create refuses to overwrite
        Gallery.create(uri, dim=DIM, model_id="model-a")
    with pytest.raises(ModelMismatchError):  # exist_ok opens it only for the same model
        Gallery.create(uri, dim=DIM, model_id="model-b", exist_ok=True)
    Gallery.create(uri, dim=DIM, model_id="model-a", exist_ok=True).close()


def test_failures_are_remembered(uri):
    g = Gallery.create(uri, dim=DIM, model_id="model-a")
    assert g.failures() == {}
    g.record_failures(
        [
            {"path": "/x/bad.jpg", "sha256": "ab" * 32, "size": 3, "mtime": 1.0, "reason": "cannot decode"},
            {"path": "/x/worse.jpg", "sha256": "cd" * 32, "size": 4, "mtime": 2.0, "reason": "empty"},
        ]
    )
    g.record_failures([{"path": "/x/bad.jpg", "sha256": "ef" * 32, "size": 5, "mtime": 3.0, "reason": "truncated"}])
    g.close()
    g = Gallery.open(uri)
    f = g.failures()
    assert set(f) == {"/x/bad.jpg", "/x/worse.jpg"} and f["/x/bad.jpg"]["reason"] == "truncated"
    g.forget_failures(["/x/bad.jpg"])
    assert list(g.failures()) == ["/x/worse.jpg"] and json.dumps(g.failures())
    g.close()


ODD_PATHS = [
    "/p/café.png",
    "/p/😀 smile.png",
    '/p/say "cheese".png',
    "/p/back\\slash.png",
    "/p/it's.png",
    "/p/new\nline.png",
    "/p/tab\tcr\r.png",
    "/p/ctl\x01.png",
    "/p/100%_done.png",
]


def test_unicode_quote_and_backslash_paths(uri):
    g = Gallery.create(uri, dim=DIM, model_id="model-a")
    x = _vectors(len(ODD_PATHS) + 1, seed=3)
    g.add([*ODD_PATHS, "/p/other.png"], x)
    assert {p: len(ids) for p, ids in g.find(ODD_PATHS).items()} == {p: 1 for p in ODD_PATHS}
    for i, p in enumerate(ODD_PATHS):
        hits = g.similar(p, k=1)
        assert hits[0].path == p and hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert np.allclose(g.embeddings(g.find(p)[p]), x[i : i + 1], atol=1e-6)
    assert g.delete(paths="/p/café.png") == 1 and g.delete(paths=ODD_PATHS[1:4]) == 3 and len(g) == 6
    assert g.find(ODD_PATHS[:4]) == {}
    g.close()


def test_typed_errors_and_edge_inputs(uri):
    g = Gallery.create(uri, dim=DIM, model_id="model-a")
    x = _vectors(3, seed=4)
    g.add(["abc", "/a.jpg"], x[:2])
    assert g.delete(paths="abc") == 1 and [r["path"] for r in g.rows()] == ["/a.jpg"]  # one str is one path
    for bad, message in (({"size": 10**30}, "below 2"), ({"width": 3.7}, "whole number"), ({"height": -1}, "non-neg")):
        with pytest.raises(InvalidInputError, match=message):
            g.add(["/b.jpg"], x[2:], [bad])
    with pytest.raises(InvalidInputError, match="all zeros"):
        g.add(["/z.jpg"], np.zeros((1, DIM), np.float32))
    with pytest.raises(InvalidInputError, match="all zeros"):
        g.search(np.zeros((1, DIM), np.float32))
    g.add(["/tiny.jpg"], x[2:] * 1e-30)  # normalised, not left tiny
    assert g.search(x[2], k=1)[0][0].path == "/tiny.jpg" and g.search(x[2], k=1)[0][0].score == pytest.approx(
        1, abs=1e-5
    )
    assert g.search(np.zeros((0, DIM), np.float32)) == []
    for expr in ('tags in ["x"]', "tags in [1]", 'array_length(tags) like "x"', 'path like "\\ud800"'):
        with pytest.raises(FilterError):
            g.rows(filter=expr)
    g.close()
    with pytest.raises(ModelMismatchError, match="holds a gallery of model model-a") as e:
        Gallery.create(uri, dim=DIM, model_id="other", exist_ok=True)
    assert "server" not in str(e.value)


_FAILURES = """
import sys
from clip_client.gallery import Gallery
if sys.argv[2] == "write":
    g = Gallery.create(sys.argv[1], dim=16, model_id="model-a")
    g.record_failures([{"path": "/x/bad.jpg", "sha256": "ab" * 32, "size": 3, "mtime": 1.0, "reason": "cannot decode"}])
    g.close()
else:
    print(sorted(Gallery.open(sys.argv[1]).failures()))
"""


def test_failures_read_back_in_a_new_process(uri):
    """A new process finds the side collection of failures released (milvus-lite, Milvus): open loads it. (milvus-lite
    keeps its file locked while the process that opened it lives: both sides run in their own process.)"""
    for step in ("write", "read"):
        out = subprocess.run([sys.executable, "-c", _FAILURES, uri, step], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "['/x/bad.jpg']"


def _text_like(n_rows: int, n_queries: int):
    """CLIP-like rows and text-like (out of distribution) queries: bench-retrieval's generator, 64 dims."""
    from clip_loadtest.retrieval import ClipLike

    gen = ClipLike(64, n_rows // 20, seed=1)
    return gen.images(n_rows, 2), gen.texts(np.random.default_rng(3).integers(0, gen.concepts, n_queries), 4)


def test_exact_search_is_brute_force(uri):
    x, q = _text_like(1500, 30)
    with Gallery.create(uri, dim=64, model_id="m") as g:
        g.add([f"/p/{i}" for i in range(len(x))], x)
        exact = [[int(h.path[3:]) for h in row] for row in g.search(q, k=10, exact=True)]
    assert exact == np.argsort(-(q @ x.T), axis=1)[:, :10].tolist()


def test_milvus_tune_stores_ef_for_text_queries(tmp_path):
    """tune() measures recall against exact search, stores the smallest ef reaching the target in the collection's
    properties, and a reopened gallery searches with it."""
    pytest.importorskip("milvus_lite")
    x, q = _text_like(1500, 30)
    uri = str(tmp_path / "m.db")
    with Gallery.create(uri, dim=64, model_id="m") as g:
        g.add([f"/p/{i}" for i in range(len(x))], x)
        point = g.tune(q, target_recall=0.99)
    with Gallery.open(uri) as g:
        reopened = (g.ef, g.info()["operating_point"])
    assert (point["recall"] >= 0.99, reopened) == (True, (point["ef"], point))


def test_milvus_index_is_hnsw_with_a_wide_search(tmp_path):
    """The Milvus backend builds HNSW (M 32, efConstruction 360) and searches with ef >= 256 for text queries."""
    pytest.importorskip("milvus_lite")
    from clip_client.gallery import milvus

    with Gallery.create(str(tmp_path / "m.db"), dim=DIM, model_id="m") as g:
        g.add(["/p/0"], _vectors(1))
        desc = g.client.describe_index(g.name, "embedding")
        params = g.search_params(10)
    assert (desc["index_type"], params["params"]["ef"], milvus.INDEX["params"]) == (
        "HNSW",
        256,
        {"M": 32, "efConstruction": 360},
    )
