"""`clip-triton index | search | classify` and the Gallery's search_text / search_image against the real Triton
server, on the embedded index and on Milvus (milvus-lite)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_client import CLIPClient
from clip_client.cli import main
from clip_client.gallery import Gallery
from tests.integration.test_client_install import needs_extra, readme_python_blocks


def _pattern(seed: int, size=(96, 72)) -> Image.Image:
    g = np.random.default_rng(seed).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(g).resize(size, Image.BICUBIC)


@pytest.fixture()
def image_dir(tmp_path):
    """10 images in nested folders, one corrupt .jpg, one truncated .png, and a text file that is ignored."""
    d = tmp_path / "photos"
    for i in range(10):
        sub = d / ("a" if i < 5 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        _pattern(i, (96 + i, 72)).save(sub / f"img{i}.{'jpg' if i % 2 else 'png'}", quality=95)
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" + bytes(range(256)))
    buf = io.BytesIO()
    _pattern(99).save(buf, format="PNG")
    (d / "b" / "truncated.png").write_bytes(buf.getvalue()[:60])
    (d / "notes.txt").write_text("not an image")
    return d


def _cli(server, capsys, *args, protocol="grpc"):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    rc = main([*args, "--url", url, "--protocol", protocol])
    return rc, capsys.readouterr()


def _index(server, capsys, image_dir, uri, *extra, protocol="grpc"):
    return _cli(server, capsys, "index", str(image_dir), "--uri", str(uri), "--no-progress", *extra, protocol=protocol)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_index_search_roundtrip(triton_server, image_dir, tmp_path, capsys, protocol):
    uri = tmp_path / "gallery"
    rc, cap = _index(triton_server, capsys, image_dir, uri, "--tag", "holiday", protocol=protocol)
    assert rc == 1  # bad files are skipped and listed, not fatal: exit status 1 (the client commands' one rule)
    assert "broken.jpg" in cap.err and "truncated.png" in cap.err
    assert "10 added" in cap.out and "2 skipped," in cap.out and "10 images in the gallery" in cap.out

    g = Gallery.open(uri)
    rows = sorted(g.rows(), key=lambda r: r["path"])
    assert len(rows) == 10 and all(r["path"].startswith(str(image_dir)) for r in rows)
    with CLIPClient(triton_server.grpc_url) as c:
        info = c.get_model_info()
        assert g.model_id == info.model_id and g.dim == info.dim
        ref = c.encode_image([r["path"] for r in rows])  # stored embeddings are the client's, normalised
    assert np.sum(ref * g.embeddings([r["id"] for r in rows]), axis=1).min() >= 0.99999
    for r in rows:
        data = Path(r["path"]).read_bytes()
        i = int(r["path"].rsplit("img", 1)[1][0])
        assert (r["width"], r["height"], r["size"], r["tags"]) == (96 + i, 72, len(data), ["holiday"])
        assert r["sha256"] == __import__("hashlib").sha256(data).hexdigest()

    # image -> images: a re-encoded, slightly resized copy of one image finds the original first
    target = next(r["path"] for r in rows if r["path"].endswith("img6.png"))
    query = tmp_path / "query.jpg"
    Image.open(target).resize((90, 68), Image.BILINEAR).save(query, quality=80)
    rc, cap = _cli(
        triton_server,
        capsys,
        "search",
        "--image",
        str(query),
        "--uri",
        str(uri),
        "-k",
        "3",
        "--json",
        protocol=protocol,
    )
    hits = json.loads(cap.out)
    assert rc == 0 and len(hits) == 3 and hits[0]["path"] == target and hits[0]["score"] > 0.99
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    assert hits[0]["width"] == 102 and hits[0]["tags"] == ["holiday"]

    # text -> images: the same ranking as the client's own math
    rc, cap = _cli(
        triton_server, capsys, "search", "a red car", "--uri", str(uri), "-k", "10", "--json", protocol=protocol
    )
    with CLIPClient(triton_server.grpc_url) as c:
        scores = g.embeddings([r["id"] for r in rows]) @ c.encode_text("a red car")  # (N, D) @ (D,)
    assert rc == 0 and [h["path"] for h in json.loads(cap.out)] == [
        rows[i]["path"] for i in np.argsort(-scores, kind="stable")
    ]

    # filters and --like (the stored embedding: no server involved)
    rc, cap = _cli(
        triton_server,
        capsys,
        "search",
        "a red car",
        "--uri",
        str(uri),
        "--json",
        "--filter",
        'path like "%/b/%" and width >= 103',
        protocol=protocol,
    )
    assert rc == 0 and sorted(h["path"].rsplit("/", 1)[1] for h in json.loads(cap.out)) == [
        "img7.jpg",
        "img8.png",
        "img9.jpg",
    ]
    rc = main(["search", "--like", target, "--uri", str(uri), "-k", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert (
        rc == 0 and len(lines) == 2 and lines[0].split()[0] == "1" and not any(line.endswith(target) for line in lines)
    )
    # a search that finds nothing says so
    rc, cap = _cli(
        triton_server, capsys, "search", "a red car", "--uri", str(uri), "--filter", "width > 100000", protocol=protocol
    )
    assert rc == 0 and cap.out.strip() == "no match"


def test_incremental_duplicates_moves_changes_and_failures(triton_server, image_dir, tmp_path, capsys):
    uri = tmp_path / "g"
    _index(triton_server, capsys, image_dir, uri)
    before = {r["path"]: r["id"] for r in Gallery.open(uri).rows()}

    # nothing changed: no file is read again, the bad files are not re-sent
    rc, cap = _index(triton_server, capsys, image_dir, uri)
    assert (
        rc == 0 and "0 added" in cap.out and "10 unchanged" in cap.out and "2 skipped earlier and unchanged" in cap.out
    )
    assert "broken.jpg" not in cap.err
    assert {r["path"]: r["id"] for r in Gallery.open(uri).rows()} == before

    # a duplicate keeps both paths (no request: its embedding is reused); a moved folder leaves no stale path;
    # a changed file is re-embedded; a fixed bad file is indexed
    shutil.copy(image_dir / "a" / "img0.png", image_dir / "copy_of_img0.png")
    shutil.move(image_dir / "b", image_dir / "moved")
    _pattern(42).save(image_dir / "a" / "img1.jpg")
    _pattern(43).save(image_dir / "broken.jpg")
    rc, cap = _index(triton_server, capsys, image_dir, uri)
    assert rc == 0, cap.err
    assert "2 added" in cap.out and "6 reused" in cap.out and "1 changed" in cap.out and "5 removed" in cap.out
    g = Gallery.open(uri)
    paths = sorted(r["path"] for r in g.rows())
    assert len(paths) == 12 and not any("/b/" in p for p in paths) and sum("/moved/" in p for p in paths) == 5
    assert str(image_dir / "broken.jpg") in paths and "2 skipped earlier and unchanged" not in cap.out
    assert list(g.failures()) == [str(image_dir / "moved" / "truncated.png")]  # a moved bad file: not sent again
    assert "1 skipped earlier and unchanged" in cap.out and "truncated" not in cap.err

    with CLIPClient(triton_server.grpc_url) as c:
        hits = g.search_image(c, str(image_dir / "a" / "img0.png"), k=2)[0]
        assert {h.path for h in hits} == {str(image_dir / "a" / "img0.png"), str(image_dir / "copy_of_img0.png")}
        assert hits[0].score == pytest.approx(hits[1].score, abs=1e-6)
        changed = g.search_image(c, str(image_dir / "a" / "img1.jpg"), k=1)[0][0]
        assert changed.path.endswith("img1.jpg") and changed.score > 0.9999
        # text queries through the Python API, several at once
        texts = ["a red car", "a photo of a cat"]
        got = g.search_text(c, texts, k=3)
        emb = c.encode_text(texts)
    assert [[h.path for h in row] for row in got] == [[h.path for h in row] for row in g.search(emb, k=3)]

    # --retry-failed sends a remembered bad file again
    (image_dir / "moved" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n broken again")
    _index(triton_server, capsys, image_dir, uri)
    rc, cap = _index(triton_server, capsys, image_dir, uri, "--retry-failed")
    assert rc == 1 and "1 skipped," in cap.out and "truncated.png" in cap.err


def test_moved_folder_and_prune(triton_server, image_dir, tmp_path, capsys):
    """Moving the indexed folder itself: indexing it at its new place drops the old paths (same content, path gone);
    --prune drops every row whose file is missing, wherever it was indexed from."""
    uri, other = tmp_path / "g", tmp_path / "other"
    other.mkdir()
    _pattern(7, (50, 40)).save(other / "lone.png")
    _index(triton_server, capsys, image_dir, uri)
    _index(triton_server, capsys, other, uri)
    moved = tmp_path / "photosB"
    shutil.move(image_dir, moved)
    rc, cap = _index(triton_server, capsys, moved, uri)
    assert rc == 0 and "0 added" in cap.out and "10 reused" in cap.out and "10 removed" in cap.out, cap.out
    assert "11 images in the gallery" in cap.out
    with Gallery.open(uri) as g:
        paths = [r["path"] for r in g.rows()]
        assert sorted(g.failures()) == sorted(str(moved / p) for p in ("broken.jpg", "b/truncated.png"))
    assert (
        not any(p.startswith(str(image_dir) + "/") for p in paths)
        and sum(p.startswith(str(moved)) for p in paths) == 10
    )
    rc, cap = _cli(triton_server, capsys, "search", "a red car", "--uri", str(uri), "-k", "20", "--json")
    assert rc == 0 and all(h["path"].startswith((str(moved), str(other))) for h in json.loads(cap.out))

    (other / "lone.png").unlink()
    (moved / "a" / "img0.png").unlink()
    rc, cap = _index(triton_server, capsys, moved / "b", uri, "--prune")  # prunes outside the folder indexed too
    assert rc == 0 and "2 removed" in cap.out and "9 images in the gallery" in cap.out, cap.out
    with Gallery.open(uri) as g:
        assert all(Path(r["path"]).is_file() for r in g.rows()) and len(g) == 9


def test_model_identity_refusal(triton_server, image_dir, tmp_path, capsys):
    uri = tmp_path / "g"
    with CLIPClient(triton_server.grpc_url) as c:
        dim = c.get_model_info().dim
    Gallery.create(uri, dim=dim, model_id="some-other-model").close()
    rc, cap = _cli(triton_server, capsys, "search", "a cat", "--uri", str(uri))
    assert rc == 2 and "some-other-model" in cap.err and "re-index" in cap.err
    rc, cap = _index(triton_server, capsys, image_dir, uri)  # and refuses to extend it
    assert rc == 2 and "re-index" in cap.err
    with CLIPClient(triton_server.grpc_url) as c, pytest.raises(Exception, match="re-index"):
        Gallery.open(uri).search_text(c, "a cat")


def test_milvus_backend_through_the_cli(triton_server, image_dir, tmp_path, capsys):
    """Changing the URI is all it takes: the same commands on milvus-lite give the embedded index's answers."""
    pytest.importorskip("milvus_lite")
    local, milvus = tmp_path / "g", str(tmp_path / "m.db") + "?collection=photos"
    for uri in (local, milvus):
        rc, cap = _index(triton_server, capsys, image_dir, uri)
        assert rc == 1 and "10 added" in cap.out  # 1: two files skipped
    answers = []
    for uri in (local, milvus):
        rc, cap = _cli(triton_server, capsys, "search", "a red car", "--uri", str(uri), "-k", "5", "--json")
        answers.append([(h["path"], round(h["score"], 4)) for h in json.loads(cap.out)])
    assert answers[0] == answers[1] and len(answers[0]) == 5
    # every CLI run is a new process that finds the side collection of failures released: it must be loaded too
    # (milvus-lite keeps its file locked while the process that opened it lives: a file this process never opened)
    cmd = [
        sys.executable,
        "-m",
        "clip_client.cli",
        "index",
        str(image_dir),
        "--uri",
        str(tmp_path / "cli.db"),
        "--no-progress",
        "--url",
        triton_server.grpc_url,
        "--optimize",
    ]
    runs = [subprocess.run(cmd, capture_output=True, text=True, timeout=300) for _ in range(2)]
    assert [r.returncode for r in runs] == [1, 0], runs[-1].stderr[-2000:]  # skipped in the first run only
    assert "10 added" in runs[0].stdout and "2 skipped," in runs[0].stdout
    out = runs[1]
    assert "10 unchanged" in out.stdout and "2 skipped earlier and unchanged" in out.stdout
    assert "--optimize ignored" in out.stderr and "Traceback" not in out.stderr


def test_classify_a_gallery_by_stored_embeddings(triton_server, image_dir, tmp_path, capsys):
    uri = tmp_path / "g"
    _index(triton_server, capsys, image_dir, uri)
    labels = ["cat", "dog", "red car"]
    rc, cap = _cli(
        triton_server,
        capsys,
        "classify",
        "--uri",
        str(uri),
        "--labels",
        *labels,
        "--json",
        "--filter",
        'path like "%/a/%"',
    )
    result = json.loads(cap.out)["results"]
    files = sorted(str(p) for p in (image_dir / "a").glob("img*"))
    assert rc == 0 and sorted(r["path"] for r in result) == files
    rc, cap = _cli(triton_server, capsys, "classify", *files, "--labels", *labels, "--json")  # the files themselves
    expected = {r["path"]: r["labels"] for r in json.loads(cap.out)["results"]}
    for row in result:
        got, want = row["labels"], expected[row["path"]]
        assert [x["label"] for x in got] == [x["label"] for x in want]
        assert [x["score"] for x in got] == pytest.approx([x["score"] for x in want], abs=1e-5)
    rc, cap = _cli(triton_server, capsys, "classify", "--labels", "a", "b")
    assert rc == 2 and "exactly one" in cap.err


def test_readme_gallery_and_adapter_examples(triton_server, tmp_path):
    """The README's gallery and adapter examples run as written, in the full install."""
    from clip_server.demo import sample_images

    examples = [b for b in readme_python_blocks() if needs_extra(b)]
    assert len(examples) >= 2, "the README shows the gallery API and the adapters"
    sample_images(tmp_path / ".artifacts" / "demo" / "images")  # the photos `make demo` leaves for the examples
    for i, block in enumerate(examples):
        code = block.replace("127.0.0.1:8001", triton_server.grpc_url).replace("127.0.0.1:8000", triton_server.http_url)
        script = tmp_path / f"example_{i}.py"
        script.write_text(code, encoding="utf-8")
        done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"README example {i} failed:\n{code}\n{done.stderr[-3000:]}"
    assert (tmp_path / "photos.gallery" / "gallery.json").is_file()
