"""Golden parity against transformers: `python -m clip_build.parity [--size tiny|base]` prints min cosine per tower.

The reference functions here are also used by tests/test_parity.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
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


def cosine_min(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest row-wise cosine similarity between two (N, D) tensors."""
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).min())


def _pooled(out) -> torch.Tensor:
    return out.pooler_output if hasattr(out, "pooler_output") else out


@torch.no_grad()
def hf_text_features(family: str, text_ckpt: str | Path, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     projection: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' text embeddings: get_text_features, or (bert_vit) BertModel + mean pooling + projection."""
    from transformers import BertModel, ChineseCLIPModel, CLIPModel

    if family == "clip":
        return _pooled(CLIPModel.from_pretrained(str(text_ckpt)).eval().get_text_features(
            input_ids=input_ids, attention_mask=attention_mask))
    if family == "chinese_clip":
        return _pooled(ChineseCLIPModel.from_pretrained(str(text_ckpt)).eval().get_text_features(
            input_ids=input_ids, attention_mask=attention_mask))
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


def run(workdir: Path, size: str = "tiny", n_images: int = 4) -> dict[tuple[str, str], float]:
    """Make checkpoints, convert, build our encoders (eager + TorchScript) and compare with transformers."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from .convert import convert
    from .export import build_image_encoder, build_text_encoder, export_torchscript
    from .synthetic import make_random_checkpoint

    results: dict[tuple[str, str], float] = {}
    ckpt = {f: make_random_checkpoint(workdir / f"ckpt-{f}", f, size) for f in ("clip", "chinese_clip", "bert")}
    for family in ("clip", "chinese_clip", "bert_vit"):
        out = workdir / f"weights-{family}"
        projection = None
        if family == "bert_vit":
            hidden = int(json.loads((ckpt["bert"] / "config.json").read_text())["hidden_size"])
            dim = int(json.loads((ckpt["clip"] / "config.json").read_text())["projection_dim"])
            projection = torch.randn(dim, hidden, generator=torch.Generator().manual_seed(7)) * hidden ** -0.5
            save_file({"text_projection.weight": projection}, str(workdir / "proj.safetensors"))
            convert(str(ckpt["bert"]), out, str(ckpt["clip"]), str(workdir / "proj.safetensors"))
            text_src, vision_src = ckpt["bert"], ckpt["clip"]
        else:
            convert(str(ckpt[family]), out)
            text_src = vision_src = ckpt[family]
        tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
        manifest = json.loads((out / "manifest.json").read_text())
        max_length = manifest["tokenizer"]["max_length"]
        enc = tok(CORPUS, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        s = manifest["image"]["size"]
        px = torch.randn(n_images, 3, s, s, generator=torch.Generator().manual_seed(1))
        ref_t = hf_text_features(family, text_src, ids, mask, projection)
        ref_i = hf_image_features(vision_src, px, "chinese_clip" if family == "chinese_clip" else "clip")
        te, ie = build_text_encoder(out), build_image_encoder(out)
        export_torchscript(te, workdir / f"ts-{family}" / "text.pt")
        export_torchscript(ie, workdir / f"ts-{family}" / "image.pt")
        ts_t, ts_i = (torch.jit.load(str(workdir / f"ts-{family}" / n)) for n in ("text.pt", "image.pt"))
        with torch.no_grad():
            results[family, "text (eager)"] = cosine_min(ref_t, te(ids, mask))
            results[family, "text (torchscript)"] = cosine_min(ref_t, ts_t(ids, mask))
            results[family, "image (eager)"] = cosine_min(ref_i, ie(px))
            results[family, "image (torchscript)"] = cosine_min(ref_i, ts_i(px))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=("tiny", "base"), default="tiny")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="clip-parity-") as tmp:
        results = run(Path(tmp), args.size)
    sys.stdout.write(f"{'family':<14} {'tower':<20} {'min cosine':<12} 1 - min cosine\n")
    for (family, tower), cos in results.items():
        sys.stdout.write(f"{family:<14} {tower:<20} {cos:.9f}  {max(0.0, 1 - cos):.1e}\n")
    return 0 if min(results.values()) >= 0.99999 else 1


if __name__ == "__main__":
    sys.exit(main())
