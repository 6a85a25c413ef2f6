"""Parquet weights files (round trip, lazy reads, bad files), the pinned BPE wheel and a cheap `import clip_build`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from clip_build.weights import ParquetWeights, WeightsFormatError, write_parquet


def test_parquet_roundtrip_and_metadata(tmp_path):
    tensors = {
        "a.weight": torch.randn(3, 4),
        "a.half": torch.randn(5).half(),
        "a.bf16": torch.randn(2, 3).bfloat16(),
        "b.ids": torch.arange(6).view(2, 3),
        "b.scalar": torch.tensor(4.6052),
        "b.empty": torch.zeros(0, 7),
        "c.numpy": np.arange(4, dtype=np.float32).reshape(2, 2),
    }
    digest = write_parquet(
        tmp_path / "t.parquet", tensors.items(), {"tower": "text", "family": "x", "config": {"k": 1}}
    )
    assert len(digest) == 64
    meta = pq.ParquetFile(tmp_path / "t.parquet")
    assert meta.num_row_groups == len(tensors)  # one tensor per row group
    assert [f.name for f in meta.schema_arrow] == ["name", "dtype", "shape", "data"]
    r = ParquetWeights(tmp_path / "t.parquet")
    assert r.metadata == {"tower": "text", "family": "x", "config": {"k": 1}}
    assert r.names() == list(tensors)
    assert r.dtypes()["a.bf16"] == "bfloat16" and r.dtypes()["c.numpy"] == "float32"
    got = r.read_torch()
    for name, t in tensors.items():
        t = torch.as_tensor(t)
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert set(r.read(prefix="b.")) == {"b.ids", "b.scalar", "b.empty"}


def test_reader_is_lazy(tmp_path, monkeypatch):
    """Reading one tensor reads its row group only (plus the name column index)."""
    write_parquet(tmp_path / "t.parquet", ((f"t{i}", torch.full((64,), float(i))) for i in range(10)), {"tower": "x"})
    r = ParquetWeights(tmp_path / "t.parquet")
    calls = []
    real = r._file.read_row_groups
    monkeypatch.setattr(
        r._file, "read_row_groups", lambda groups, **kw: calls.append(list(groups)) or real(groups, **kw)
    )
    out = r.read(["t7"])
    assert calls == [[7]] and torch.equal(torch.from_numpy(out["t7"].copy()), torch.full((64,), 7.0))
    with pytest.raises(WeightsFormatError, match="no tensors named"):
        r.read(["nope"])


def test_duplicate_names_and_bad_files(tmp_path):
    with pytest.raises(WeightsFormatError, match="duplicate"):
        write_parquet(tmp_path / "d.parquet", [("x", torch.zeros(1)), ("x", torch.zeros(1))], {})
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(WeightsFormatError):
        ParquetWeights(tmp_path / "junk.parquet")
    with pytest.raises(WeightsFormatError, match="missing"):
        ParquetWeights(tmp_path / "absent.parquet")


def test_open_clip_wheel_pinned_by_name_and_sha256(tmp_path, monkeypatch):
    """The BPE source wheel is chosen by exact file name and refused when its sha256 is not the pinned one."""
    from clip_build import synthetic
    from clip_build.files import PinnedWheelError

    real = synthetic.open_clip_wheel()  # the user's cache (downloaded once, like every tokenizer test needs)
    monkeypatch.setenv("CLIP_TRITON_CACHE", str(tmp_path / "cache"))
    from clip_build import files

    monkeypatch.setattr(files.subprocess, "run", lambda *a, **k: pytest.fail(f"unexpected download {a}"))
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    (wheels / "open_clip_torch-9.9.9-py3-none-any.whl").write_bytes(b"another wheel, sorted last")
    shutil.copy2(real, wheels / synthetic.OPEN_CLIP_WHEEL_FILE)
    assert synthetic.open_clip_wheel() == wheels / synthetic.OPEN_CLIP_WHEEL_FILE
    out = synthetic.clip_bpe_files()
    assert json.loads((out / "vocab.json").read_text(encoding="utf-8"))["<|endoftext|>"] == 49407
    (out / "vocab.json").write_text("{}")  # a tampered derived file is rebuilt from the verified wheel
    assert (
        synthetic.clip_bpe_files() == out and len(json.loads((out / "vocab.json").read_text(encoding="utf-8"))) == 49408
    )
    data = bytearray((wheels / synthetic.OPEN_CLIP_WHEEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (wheels / synthetic.OPEN_CLIP_WHEEL_FILE).write_bytes(bytes(data))
    with pytest.raises(PinnedWheelError, match="sha256"):
        synthetic.open_clip_wheel()
    (out / "merges.txt").unlink()
    with pytest.raises(PinnedWheelError, match="sha256"):
        synthetic.clip_bpe_files()


def test_import_clip_build_is_cheap():
    code = "import sys, clip_build, clip_build.weights, clip_build.convert\nassert 'torch' not in sys.modules\n"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
