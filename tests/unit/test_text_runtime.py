"""clip_runtime.text without a reference: UTF-8 decoding, byte inputs and empty batches on a real tokenizer.json,
and no torch (ids vs the HF tokenizer: tests/parity/test_tokenizer.py)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from clip_build.synthetic import minilm_dir
from clip_runtime.errors import InvalidInputError
from clip_runtime.text import TextTokenizer, decode_text


def test_decode_text():
    assert decode_text("héllo".encode()) == "héllo"
    assert decode_text(np.array([b"abc"], dtype=object)[0]) == "abc"
    assert decode_text(np.bytes_(b"x")) == "x"
    assert decode_text("already str") == "already str"
    with pytest.raises(InvalidInputError, match="UTF-8"):
        decode_text(b"\xff\xfebad")
    assert issubclass(InvalidInputError, ValueError)


def test_encode_bytes_and_empty_batch():
    ours = TextTokenizer(minilm_dir() / "tokenizer.json", 64, 0)  # a real WordPiece tokenizer.json
    ids, lengths, widths = ours.encode_bytes([b"a photo", "日本".encode()])
    assert ids.shape == (2, int(lengths.max())) and widths.tolist() == [[ids.shape[1]]] * 2
    rows, counts = ours.encode_counted(["a photo", "日本"])  # encode_text's token_counts: the tokens fed, per text
    assert counts.dtype == np.int32 and counts.tolist() == rows.lengths.reshape(-1).tolist() == lengths.ravel().tolist()
    with pytest.raises(InvalidInputError):
        ours.encode_bytes([b"ok", b"\xc3\x28"])
    ids, lengths, widths = ours.encode_batch([])
    assert ids.shape == (0, 1) and lengths.shape == widths.shape == (0, 1)


def test_runtime_never_imports_torch():
    code = (
        "import sys, clip_runtime.text, clip_runtime.errors\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]\n"
        "assert not bad, bad\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
