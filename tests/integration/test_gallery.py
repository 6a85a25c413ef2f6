"""`clip-triton index | search | classify` against the real Triton server."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clip_client import CLIPClient
from clip_client.cli import main
from clip_client.gallery import Gallery


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
        _pattern(i).save(sub / f"img{i}.{'jpg' if i % 2 else 'png'}", quality=95)
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" + bytes(range(256)))
    buf = io.BytesIO()
    _pattern(99).save(buf, format="PNG")
    (d / "b" / "truncated.png").write_bytes(buf.getvalue()[:60])
    (d / "notes.txt").write_text("not an image")
    return d


def _index(server, image_dir, out, protocol="grpc", capsys=None):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    rc = main(["index", str(image_dir), "--out", str(out), "--url", url, "--protocol", protocol, "--no-progress"])
    captured = capsys.readouterr() if capsys else None
    return rc, captured


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_index_search_roundtrip(triton_server, image_dir, tmp_path, capsys, protocol):
    out = tmp_path / "gallery.parquet"
    rc, cap = _index(triton_server, image_dir, out, protocol, capsys)
    assert rc == 1  # some files failed: reported, not fatal
    assert "broken.jpg" in cap.err and "truncated.png" in cap.err
    assert "10 added" in cap.out and "2 failed" in cap.out

    # schema and identity
    schema = pq.read_schema(out)
    assert str(schema.field("embedding").type).startswith("fixed_size_list<element: float>")
    g = Gallery.load(out)
    assert len(g) == 10 and all(p.endswith((".jpg", ".png")) for p in g.paths)
    with CLIPClient(triton_server.grpc_url) as c:
        info = c.get_model_info()
        assert g.identity["model_id"] == info.model_id and g.dim == info.dim
        # stored embeddings are the client's normalised embeddings of the files
        ref = c.encode_image(g.paths)
    assert (np.sum(ref * g.embeddings, axis=1)).min() >= 0.99999

    # image -> images: a re-encoded, slightly resized copy of one image finds the original first
    target = next(p for p in g.paths if p.endswith("img6.png"))
    query = tmp_path / "query.jpg"
    Image.open(target).resize((90, 68), Image.BILINEAR).save(query, quality=80)
    url = triton_server.grpc_url if protocol == "grpc" else triton_server.http_url
    rc = main(["search", "--image", str(query), "--gallery", str(out), "-k", "3", "--json",
               "--url", url, "--protocol", protocol])
    hits = json.loads(capsys.readouterr().out)
    assert rc == 0 and len(hits) == 3
    assert hits[0]["path"] == target and hits[0]["score"] > 0.99
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]

    # text -> images: same ranking as the client's own math
    rc = main(["search", "a red car", "--gallery", str(out), "-k", "10", "--json", "--url", url, "--protocol", protocol])
    hits = json.loads(capsys.readouterr().out)
    with CLIPClient(triton_server.grpc_url) as c:
        scores = g.embeddings @ c.encode_text("a red car")
    assert rc == 0 and [h["path"] for h in hits] == [g.paths[i] for i in np.argsort(-scores, kind="stable")]

    # plain table output
    assert main(["search", "a red car", "--gallery", str(out), "-k", "2", "--url", url, "--protocol", protocol]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].split()[0] == "1"


def test_incremental_index(triton_server, image_dir, tmp_path, capsys):
    out = tmp_path / "g.parquet"
    _index(triton_server, image_dir, out, capsys=capsys)
    before = Gallery.load(out)

    rc, cap = _index(triton_server, image_dir, out, capsys=capsys)
    assert "0 added, 10 already indexed" in cap.out
    after = Gallery.load(out)
    assert after.paths == before.paths and np.array_equal(after.embeddings, before.embeddings)

    # a new file is added; a copy of a known file (same content) is skipped
    _pattern(42).save(image_dir / "a" / "new.png")
    shutil.copy(image_dir / "a" / "img0.png", image_dir / "copy_of_img0.png")
    (image_dir / "broken.jpg").unlink()
    (image_dir / "b" / "truncated.png").unlink()
    rc, cap = _index(triton_server, image_dir, out, capsys=capsys)
    assert rc == 0 and "1 added, 11 already indexed, 0 failed" in cap.out
    assert len(Gallery.load(out)) == 11

    # --prune drops rows whose files are gone
    (image_dir / "a" / "new.png").unlink()
    rc = main(["index", str(image_dir), "--out", str(out), "--url", triton_server.grpc_url, "--no-progress", "--prune"])
    assert rc == 0 and "1 pruned" in capsys.readouterr().out
    assert len(Gallery.load(out)) == 10


def test_search_refuses_other_model(triton_server, image_dir, tmp_path, capsys):
    out = tmp_path / "g.parquet"
    _index(triton_server, image_dir, out, capsys=capsys)
    g = Gallery.load(out)
    g.identity["model_id"] = "some-other-model"
    g.save(out)
    rc = main(["search", "a cat", "--gallery", str(out), "--url", triton_server.grpc_url])
    err = capsys.readouterr().err
    assert rc == 2 and "some-other-model" in err and "re-index" in err
    rc, cap = _index(triton_server, image_dir, out, capsys=capsys)  # and refuses to extend it
    assert rc == 2 and "re-index" in cap.err
