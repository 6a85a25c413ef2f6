"""The transformers reference the parity tests compare against: features as transformers computes them, a varied
text corpus, and the comparison helpers. Test code only (transformers is the reference, never a runtime dependency).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# A varied corpus: ascii, unicode, CJK, emoji, punctuation, whitespace, empty, longer than any position limit.
CORPUS = [
    "a photo of a cat",
    "a photo of a dog",
    "",
    "   ",
    "Ünïcödé àccents, naïve café — “quotes” …",
    "日本語のテキストと中文文本",
    "🐱🐶🚀 emoji only 👍🏽",
    "punctuation!!! ??? ... ;;; (brackets) [x] {y} <z>",
    "tabs\tand\nnewlines\r\n  mixed   spaces",
    "UPPER lower MiXeD 12345 3.14159",
    "word " * 120,
    "超长的中文文本" * 40,
]


def token_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A right-padded (N, L) batch as the text encoder takes it: ids, lengths (N, 1), widths (N, 1)."""
    lengths = attention_mask.sum(dim=1, keepdim=True)  # (N, 1)
    return input_ids, lengths, torch.full_like(lengths, input_ids.shape[1])


def ragged_rows_of(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The same texts as a ragged batch, as Triton hands it over: each row cut to its own length, all back to back
    in one 1-D tensor; lengths = widths (N, 1)."""
    lengths = attention_mask.sum(dim=1, keepdim=True)  # (N, 1)
    flat = torch.cat([row[:n] for row, n in zip(input_ids, lengths.view(-1).tolist())])  # (sum n,)
    return flat, lengths, lengths.clone()


def cosine_min(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest row-wise cosine similarity between two (N, D) tensors."""
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).min())


def _pooled(out) -> torch.Tensor:
    return out.pooler_output if hasattr(out, "pooler_output") else out


@torch.no_grad()
def hf_text_features(
    family: str,
    text_ckpt: str | Path,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    projection: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' text embeddings: get_text_features, or (bert_vit) BertModel + mean pooling + projection."""
    from transformers import BertModel, ChineseCLIPModel, CLIPModel

    if family == "clip":
        return _pooled(
            CLIPModel.from_pretrained(str(text_ckpt))
            .eval()
            .get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        )
    if family == "chinese_clip":
        return _pooled(
            ChineseCLIPModel.from_pretrained(str(text_ckpt))
            .eval()
            .get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        )
    if projection is None:
        raise ValueError("bert_vit needs the text projection weight")
    hidden = BertModel.from_pretrained(str(text_ckpt)).eval()(input_ids=input_ids, attention_mask=attention_mask)[0]
    m = attention_mask.unsqueeze(-1).float()  # (B, T, 1)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, H) sentence-transformers mean pooling
    return pooled @ projection.T  # (B, D)


@torch.no_grad()
def hf_image_features(vision_ckpt: str | Path, pixel_values: torch.Tensor, family: str = "clip") -> torch.Tensor:
    """transformers' get_image_features of a CLIP / Chinese-CLIP checkpoint."""
    from transformers import ChineseCLIPModel, CLIPModel

    cls = ChineseCLIPModel if family == "chinese_clip" else CLIPModel
    return _pooled(cls.from_pretrained(str(vision_ckpt)).eval().get_image_features(pixel_values=pixel_values))


def top1(text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """argmax over images of the normalised text-image similarity matrix (T,)."""
    t = torch.nn.functional.normalize(text.double(), dim=-1)
    i = torch.nn.functional.normalize(image.double(), dim=-1)
    return (t @ i.T).argmax(dim=-1)


def hf_tokenize(weights_dir: Path, texts=CORPUS, padding="longest"):
    """HF tokenizer of the WEIGHTS_DIR -> (input_ids, attention_mask)."""
    from transformers import AutoTokenizer

    manifest = json.loads((weights_dir / "manifest.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(weights_dir / "tokenizer"))
    enc = tok(
        texts, padding=padding, truncation=True, max_length=manifest["tokenizer"]["max_length"], return_tensors="pt"
    )
    return enc["input_ids"], enc["attention_mask"]


def random_pixels(weights_dir: Path, n: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, S, S) standard-normal pixel values for a WEIGHTS_DIR's image size."""
    s = json.loads((weights_dir / "manifest.json").read_text())["image"]["size"]
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))
