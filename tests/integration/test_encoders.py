"""Our encoders against themselves: ragged batches equal max_length padding and single rows, reduced precision
stays close to fp32, model.pt runs without the project (parity with transformers: tests/parity/test_parity.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from clip_build.export import build_image_encoder, build_text_encoder, export_torchscript
from clip_runtime.text import TextTokenizer
from tests.parity.reference import CORPUS, cosine_min, hf_tokenize, random_pixels, token_rows

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.* deprecation notices


@pytest.mark.parametrize("family", ["clip", "chinese_clip", "bert_vit"])
def test_padding_to_the_batch_longest_equals_padding_to_max_length(weights, family):
    """Rows of different lengths in one ragged batch (each request padded to its own longest, the encoder padding
    the batch to its longest row) give the same embeddings as every text padded to max_length, and as each alone."""
    w = weights(family)
    manifest = json.loads((w / "manifest.json").read_text())
    t = manifest["tokenizer"]
    texts = ["a photo of a cat", "short", "", "a somewhat longer sentence with more words in it"]
    tok = TextTokenizer(w / "tokenizer" / "tokenizer.json", t["max_length"], t["pad_token_id"])
    requests = [tok.encode_batch(texts[:2]), tok.encode_batch(texts[2:3]), tok.encode_batch(texts[3:])]
    assert len({r.ids.shape[1] for r in requests}) == 3  # three widths in one batch
    flat = torch.cat([torch.from_numpy(r.ids).reshape(-1) for r in requests])  # as Triton hands a ragged input over
    lengths, widths = (
        torch.from_numpy(np.concatenate([getattr(r, n) for r in requests])) for n in ("lengths", "widths")
    )
    full_ids, full_mask = hf_tokenize(w, texts, padding="max_length")
    assert full_ids.shape[1] == t["max_length"]
    enc = build_text_encoder(w)
    with torch.no_grad():
        batch = enc(flat, lengths, widths)
        full = enc(*token_rows(full_ids, full_mask))
        alone = torch.cat([enc(*map(torch.from_numpy, tok.encode_batch([text])[:3])) for text in texts])  # ids..widths
    for other in (full, alone):
        assert torch.allclose(batch, other, atol=1e-5, rtol=1e-4)
        assert cosine_min(batch, other) >= 0.999999


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_reduced_precision_casts_inside(weights, dtype, tmp_path):
    """fp16/bf16 builds take fp32 pixels / int64 ids and return fp32, close to the fp32 build."""
    w = weights("clip")
    px = random_pixels(w, 3)
    ids, mask = hf_tokenize(w, CORPUS[:4])
    ie, te = build_image_encoder(w, dtype), build_text_encoder(w, dtype)
    assert ie.visual_projection.weight.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    export_torchscript(ie, tmp_path / "image.pt")
    ts = torch.jit.load(str(tmp_path / "image.pt"))
    with torch.no_grad():
        ref_i, ref_t = build_image_encoder(w)(px), build_text_encoder(w)(*token_rows(ids, mask))
        got_i, got_t, got_ts = ie(px), te(*token_rows(ids, mask)), ts(px)
    for got, ref in ((got_i, ref_i), (got_t, ref_t), (got_ts, ref_i)):
        assert got.dtype == torch.float32
        assert cosine_min(ref, got) >= 0.999


def test_torchscript_loads_without_project(weights, tmp_path):
    """model.pt runs in a fresh interpreter that imports only torch, with dynamic batch and sequence length."""
    w = weights("clip")
    export_torchscript(build_text_encoder(w), tmp_path / "text.pt")
    export_torchscript(build_image_encoder(w), tmp_path / "image.pt")
    code = (
        "import sys, torch\n"
        f"t = torch.jit.load({str(tmp_path / 'text.pt')!r}); i = torch.jit.load({str(tmp_path / 'image.pt')!r})\n"
        "for b, l in ((1, 5), (3, 16), (2, 77)):\n"
        "    ids = torch.randint(0, 49406, (b * l,)); rows = torch.full((b, 1), l)\n"
        "    assert t(ids, rows, rows).shape == (b, 24)\n"
        "for b in (1, 4):\n"
        "    assert i(torch.randn(b, 3, 32, 32)).shape == (b, 24)\n"
        "assert t.forward.schema.arguments[1].name == 'input_ids', t.forward.schema\n"
        "assert [a.name for a in t.forward.schema.arguments[2:]] == ['lengths', 'widths']\n"
        "assert i.forward.schema.arguments[1].name == 'pixel_values'\n"
        "assert not any(m.startswith(('clip_build', 'transformers')) for m in sys.modules)\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
