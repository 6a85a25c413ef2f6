"""clip_runtime.text.TextTokenizer: token ids identical to the HF tokenizer, padding to the longest, UTF-8 errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clip_runtime.text import TextTokenizer
from tests.parity.reference import CORPUS

EXTRA = [
    "a",
    "A",
    "don't you'll we've it's",
    "e-mail: someone@example.com, url https://x.org/a?b=c#d",
    "Ça va? Größe, straße, ﬁ ligature, Ⅻ, ½",
    "한국어 텍스트",
    "עברית ועربية",
    "Ελληνικά κείμενο",
    "zero\u200bwidth\u200djoiner",
    "\u00a0nbsp\u3000ideographic space",
    "👨‍👩‍👧‍👦 family emoji 🇫🇷 flag",
    "\x00control\x07chars",
    "<|startoftext|> literal special <|endoftext|>",
    "[CLS] [SEP] [PAD] [MASK]",
    "x" * 500,
    "a b " * 300,
    "中" * 600,
]
TEXTS = CORPUS + EXTRA


def _pair(weights_dir):
    """(our TextTokenizer, HF tokenizer, max_length) for a WEIGHTS_DIR."""
    from transformers import AutoTokenizer

    t = json.loads((weights_dir / "manifest.json").read_text())["tokenizer"]
    ours = TextTokenizer(weights_dir / t["dir"] / "tokenizer.json", t["max_length"], t["pad_token_id"])
    hf = AutoTokenizer.from_pretrained(str(weights_dir / t["dir"]))
    return ours, hf, t["max_length"]


def _assert_same(ours, hf, max_length, texts):
    (ids, lengths, widths), counts = ours.encode_counted(texts)
    ref = hf(texts, truncation=True, max_length=max_length)
    longest = max(len(r) for r in ref["input_ids"])
    assert ids.dtype == lengths.dtype == widths.dtype == np.int64
    assert ids.shape == (len(texts), longest) and widths.tolist() == [[longest]] * len(texts)
    assert lengths.tolist() == [[len(r)] for r in ref["input_ids"]]
    assert counts.tolist() == [len(r) for r in ref["input_ids"]]  # tokens fed to the encoder (token_counts)
    for i, (r_ids, r_mask) in enumerate(zip(ref["input_ids"], ref["attention_mask"])):
        n = len(r_ids)
        assert ids[i, :n].tolist() == r_ids, texts[i]
        assert r_mask == [1] * n
        assert (ids[i, n:] == ours.pad_token_id).all()


@pytest.mark.parametrize("family", ["clip", "chinese_clip", "bert_vit"])
def test_ids_match_hf_on_varied_corpus(weights, family):
    ours, hf, max_length = _pair(weights(family))
    _assert_same(ours, hf, max_length, TEXTS)
    for text in TEXTS:  # one at a time too: padding depends only on the batch
        _assert_same(ours, hf, max_length, [text])


def test_clip_uses_real_vocabulary(weights):
    ours, _, _ = _pair(weights("clip"))
    ids, lengths, _ = ours.encode_batch(["a photo of a cat"])
    assert ids.tolist() == [[49406, 320, 1125, 539, 320, 2368, 49407]]  # OpenAI CLIP's ids
    assert lengths.tolist() == [[7]]


def test_truncation_keeps_special_tokens(weights):
    ours, hf, max_length = _pair(weights("clip"))
    ids, lengths, _ = ours.encode_batch(["word " * 200])
    assert ids.shape == (1, max_length) == (1, 77)
    assert ids[0, 0] == 49406 and ids[0, -1] == 49407 and lengths.tolist() == [[77]]
    ours_b, _, max_b = _pair(weights("bert_vit"))
    ids, _, _ = ours_b.encode_batch(["word " * 200])
    assert ids.shape == (1, max_b) and ids[0, 0] == 101 and ids[0, -1] == 102  # [CLS] ... [SEP]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(max_size=120), min_size=1, max_size=4))
def test_ids_match_hf_property(weights, texts):
    for family in ("clip", "bert_vit"):
        ours, hf, max_length = _pair_cached(weights(family))
        _assert_same(ours, hf, max_length, texts)


_CACHE: dict = {}


def _pair_cached(weights_dir):
    if weights_dir not in _CACHE:
        _CACHE[weights_dir] = _pair(weights_dir)
    return _CACHE[weights_dir]
