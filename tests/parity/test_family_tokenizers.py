"""The served tokenizers of the new families against their references, id for id: open_clip's SimpleTokenizer
(open_clip_torch 3.3.0 from the pinned wheel) and transformers' SiglipTokenizer (a small SentencePiece model trained
here: no registry package ships SigLIP's)."""

from __future__ import annotations

import json
import random
import warnings
import zipfile

from clip_build.families import write_fixed_length_tokenizer
from clip_build.synthetic import BPE_MEMBER, open_clip_wheel
from clip_runtime.text import OpenClipBPE, SiglipSentencePiece
from tests.parity.reference import CORPUS

ODD = [
    "&amp; html &lt;b&gt; escapes",
    "Ã©mojibake fixed by ftfy",
    "ﬁ ligature and ｆｕｌｌ width",
    "“curly” ‘quotes’",
    "<start_of_text> special <end_of_text> tokens",
    "under_score snake_case",
    "don't it's we're I'll",
    "a  b\u00a0c\u2003d",
    "\x1f\x0b control",
    "x" * 300,
]


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abcXYZ ,.!?'\"-_&;<>\t\n") + ["</s>", "<unk>", "ä", "ß", "é", "日本", "🐱", "\u2581", "&amp;"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def test_open_clip_bpe_matches_open_clip_tokenizer(tmp_path):
    from tests.parity.open_clip_reference import open_clip

    oc = open_clip()
    reference = oc.get_tokenizer("ViT-B-32")  # the default SimpleTokenizer, context 77
    with zipfile.ZipFile(open_clip_wheel()) as zf:
        (tmp_path / "bpe.txt.gz").write_bytes(zf.read(BPE_MEMBER))
    ours = OpenClipBPE(tmp_path / "bpe.txt.gz", {"clean": "lower"}, 77, 0, fixed=True)
    texts = CORPUS + ODD + _random_texts(400, 0)
    want = reference(texts).tolist()
    got = ours.encode_batch(texts).ids.tolist()
    assert [t for t, w, g in zip(texts, want, got) if w != g] == []


def test_siglip_sentencepiece_matches_siglip_tokenizer(checkpoints, tmp_path):
    from transformers import AutoTokenizer

    ckpt = checkpoints("siglip")
    block = write_fixed_length_tokenizer(ckpt, tmp_path, 16)
    settings = json.loads((tmp_path / block["settings"]).read_text())
    ours = SiglipSentencePiece(tmp_path / block["file"], settings, block["max_length"], block["pad_token_id"])
    reference = AutoTokenizer.from_pretrained(str(ckpt))
    texts = CORPUS + ODD + _random_texts(400, 1)
    with warnings.catch_warnings():  # transformers warns about texts that already end in </s>
        warnings.simplefilter("ignore")
        want = reference(texts, padding="max_length", max_length=16, truncation=True)["input_ids"]
    got = ours.encode_batch(texts).ids.tolist()
    assert [t for t, w, g in zip(texts, want, got) if w != g] == []
