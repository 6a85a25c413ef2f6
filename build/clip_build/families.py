"""Layouts beyond transformers' CLIP: SigLIP (transformers SiglipModel, SigLIP 2 at fixed resolution), open_clip hub
folders (open_clip_config.json + weights) and open_clip training checkpoints (epoch_N.pt + --model-config).

Every layout maps onto the same towers (clip_build.modules): a pre-LN text transformer (causal or not; EOT, EOS or
last-position pooling) and a ViT (class token or not; class-token, average or SigLIP attention-pool "MAP" pooling).
Key mapping stays explicit and strict, as in clip_build.convert: every expected tensor present with its shape, no
tensor left over.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .convert import (IGNORED, ConvertError, Converted, KeyMappingError, Mapping_, _clip_layers, _linear, _norm,
                      _source_name, _warn, check_leftovers, image_settings, load_state_dict, take)

log = logging.getLogger(__name__)

OPEN_CLIP_CONFIG = "open_clip_config.json"


# ----------------------------------------------------------------------------------------------- shared mapping
def _split_in_proj(sd: dict[str, Any], hf: str, ours: str, h: int, source: str) -> list[tuple[str, Any]]:
    """A fused attention input projection (in_proj_weight (3h, h), in_proj_bias (3h,)) -> our q, k, v linears."""
    out = []
    for kind, shape in (("weight", (3 * h, h)), ("bias", (3 * h,))):
        key = f"{hf}.in_proj_{kind}"
        if key not in sd:
            raise KeyMappingError(f"{source}: checkpoint does not match its config:\n  missing: {key}")
        t = sd.pop(key)
        if tuple(t.shape) != shape:
            raise KeyMappingError(f"{source}: wrong shape: {key}: {tuple(t.shape)} != expected {shape}")
        for name, part in zip("qkv", t.chunk(3, dim=0)):
            out.append((f"{ours}.{name}.{kind}", part.contiguous()))
    return out


def _identity(n: int) -> Any:
    import torch

    return torch.eye(n)


def _empty() -> Any:
    import torch

    return torch.zeros(0)


# ------------------------------------------------------------------------------------------------------- SigLIP
def _siglip_text_cfg(t: Mapping[str, Any]) -> dict[str, Any]:
    return {"vocab_size": t["vocab_size"], "max_position_embeddings": t["max_position_embeddings"],
            "hidden_size": t["hidden_size"], "num_hidden_layers": t["num_hidden_layers"],
            "num_attention_heads": t["num_attention_heads"], "intermediate_size": t["intermediate_size"],
            "hidden_act": t["hidden_act"], "layer_norm_eps": t["layer_norm_eps"],
            "eos_token_id": int(t.get("eos_token_id") or 1), "causal": False, "pool": "last", "proj_bias": True}


def _siglip_vision_cfg(v: Mapping[str, Any]) -> dict[str, Any]:
    return {"image_size": v["image_size"], "patch_size": v["patch_size"], "num_channels": v.get("num_channels", 3),
            "hidden_size": v["hidden_size"], "num_hidden_layers": v["num_hidden_layers"],
            "num_attention_heads": v["num_attention_heads"], "intermediate_size": v["intermediate_size"],
            "hidden_act": v["hidden_act"], "layer_norm_eps": v["layer_norm_eps"],
            "class_token": False, "patch_bias": True, "pre_norm": False, "pool": "map"}


def _siglip_text_mapping(cfg: Mapping[str, Any], projection_dim: int, hf: str = "text_model.") -> Mapping_:
    h = cfg["hidden_size"]
    m: Mapping_ = {
        f"{hf}embeddings.token_embedding.weight": ("text.token_embedding.weight", (cfg["vocab_size"], h)),
        f"{hf}embeddings.position_embedding.weight": ("text.position_embedding.weight",
                                                      (cfg["max_position_embeddings"], h)),
    }
    _clip_layers(m, hf, "text.", cfg)
    _norm(m, f"{hf}final_layer_norm", "text.final_ln", h)
    _linear(m, f"{hf}head", "text_projection", projection_dim, h)
    return m


def _siglip_vision_mapping(cfg: Mapping[str, Any], hf: str = "vision_model.") -> Mapping_:
    h, p, c, inter = cfg["hidden_size"], cfg["patch_size"], cfg["num_channels"], cfg["intermediate_size"]
    m: Mapping_ = {
        f"{hf}embeddings.patch_embedding.weight": ("vision.patch_embedding.weight", (h, c, p, p)),
        f"{hf}embeddings.patch_embedding.bias": ("vision.patch_embedding.bias", (h,)),
        f"{hf}embeddings.position_embedding.weight": ("vision.position_embedding.weight",
                                                      ((cfg["image_size"] // p) ** 2, h)),
        f"{hf}head.probe": ("vision.head.probe", (1, 1, h)),
    }
    _clip_layers(m, hf, "vision.", cfg)
    _norm(m, f"{hf}post_layernorm", "vision.post_ln", h)
    _linear(m, f"{hf}head.attention.out_proj", "vision.head.out", h, h)
    _norm(m, f"{hf}head.layernorm", "vision.head.ln", h)
    _linear(m, f"{hf}head.mlp.fc1", "vision.head.mlp.fc1", inter, h)
    _linear(m, f"{hf}head.mlp.fc2", "vision.head.mlp.fc2", h, inter)
    return m


def siglip(checkpoint: str, src: Path, raw: dict[str, Any], allow_pickle: bool) -> Converted:
    """transformers SiglipModel (SigLIP, and SigLIP 2 at fixed resolution: model_type siglip)."""
    if raw.get("model_type") == "siglip2":
        raise ConvertError(
            f"{checkpoint}: model_type siglip2 (Siglip2Model, NaFlex) is not supported: its image tower takes a "
            "variable number of patches (pixel_attention_mask, spatial_shapes) and keeps each image's aspect ratio, "
            "while the served image encoder takes one fixed square input. Fixed-resolution SigLIP 2 checkpoints "
            "(model_type siglip, e.g. google/siglip2-base-patch16-224) are supported")
    from transformers import SiglipConfig

    conf = SiglipConfig.from_pretrained(str(src))
    tconf, vconf = conf.text_config.to_dict(), conf.vision_config.to_dict()
    if not vconf.get("vision_use_head", True):
        raise ConvertError(f"{checkpoint}: vision_use_head=false: the image tower has no pooling head, so "
                           "SiglipModel gives no image embedding to serve")
    text_cfg, vision_cfg = _siglip_text_cfg(tconf), _siglip_vision_cfg(vconf)
    projection_dim = int(tconf.get("projection_size") or tconf["hidden_size"])
    if projection_dim != vision_cfg["hidden_size"]:
        raise ConvertError(f"{checkpoint}: text projection_size {projection_dim} != vision hidden_size "
                           f"{vision_cfg['hidden_size']}: the embeddings could not be compared")
    sd = load_state_dict(src, allow_pickle)
    text = take(sd, _siglip_text_mapping(text_cfg, projection_dim), str(src))
    vision = take(sd, _siglip_vision_mapping(vision_cfg), str(src))
    vision += _split_in_proj(sd, "vision_model.head.attention", "vision.head", vision_cfg["hidden_size"], str(src))
    vision += [("vision.class_embedding", _empty()), ("visual_projection.weight", _identity(projection_dim))]
    scale_bias = {}
    for key in ("logit_scale", "logit_bias"):
        if key not in sd:
            raise KeyMappingError(f"{src}: missing: {key}")
        scale_bias[key] = float(sd.pop(key).reshape(-1)[0])
    check_leftovers(sd, str(src), IGNORED)
    warnings: list[str] = []
    max_positions = int(text_cfg["max_position_embeddings"])
    return Converted(
        family="siglip", text=text, vision=vision, text_arch="clip_text", pooling="last", text_cfg=text_cfg,
        vision_cfg=vision_cfg, projection_dim=projection_dim, logit_scale=scale_bias["logit_scale"],
        logit_bias=scale_bias["logit_bias"], scoring="sigmoid",
        write_tokenizer=lambda out: write_fixed_length_tokenizer(src, out, max_positions),
        image=image_settings(src, vision_cfg, warnings), sources={"text": str(checkpoint), "vision": str(checkpoint)},
        source_name=_source_name(checkpoint),
        side_files=[p for p in [src / "preprocessor_config.json"] if p.is_file()], warnings=warnings)


def write_fixed_length_tokenizer(src: Path, out: Path, max_positions: int) -> dict[str, Any]:
    """The tokenizer of a tower run on rows padded to its context length (SigLIP: padding="max_length", no mask).

    SiglipTokenizer (SentencePiece, no fast version): spiece.model + its special tokens (tokenizer_settings.json),
    served by clip_runtime.text.SiglipSentencePiece. A fast tokenizer (SigLIP 2's Gemma): tokenizer.json.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(src))
    except Exception as e:  # noqa: BLE001 - a missing sentencepiece, a broken file: one clear message
        raise ConvertError(f"{src}: cannot load its tokenizer ({type(e).__name__}: {e}); SigLIP's needs spiece.model "
                           "and the sentencepiece package") from e
    if tok.pad_token_id is None:
        raise ConvertError(f"{src}: the tokenizer has no pad token")
    if getattr(tok, "padding_side", "right") != "right":
        raise ConvertError(f"{src}: the tokenizer pads on the {tok.padding_side}; only right padding is supported")
    limits = [max_positions] + ([int(tok.model_max_length)] if 0 < (tok.model_max_length or 0) < 1_000_000 else [])
    out.mkdir(parents=True, exist_ok=True)
    block = {"dir": "tokenizer", "max_length": min(limits), "pad_token_id": int(tok.pad_token_id),
             "padding": "max_length"}
    if type(tok).__name__ == "SiglipTokenizer":
        shutil.copy2(tok.vocab_file, out / "spiece.model")
        special = [{"content": str(t.content), "id": int(i), "lstrip": bool(t.lstrip), "rstrip": bool(t.rstrip)}
                   for i, t in sorted(tok.added_tokens_decoder.items())]
        settings = {"eos_token": str(tok.eos_token), "unk_token": str(tok.unk_token),
                    "do_lower_case": bool(getattr(tok, "do_lower_case", True)), "special": special}
        (out / "tokenizer_settings.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        return {**block, "kind": "siglip_spm", "file": "spiece.model", "settings": "tokenizer_settings.json"}
    tok.save_pretrained(str(out))
    if not (out / "tokenizer.json").is_file():
        raise ConvertError(f"{src}: its tokenizer ({type(tok).__name__}) has no fast version and is not "
                           "SiglipTokenizer: tokenizer.json is required")
    return {**block, "kind": "tokenizers_fixed", "file": "tokenizer.json"}


# ----------------------------------------------------------------------------------------------------- open_clip
def is_training_checkpoint(checkpoint: str) -> bool:
    """A file such as epoch_3.pt (open_clip's training output) rather than a folder or hub id."""
    path = Path(checkpoint).expanduser()
    return path.is_file() and path.suffix in (".pt", ".pth", ".bin", ".safetensors")


def open_clip_hub(checkpoint: str, src: Path, allow_pickle: bool, tokenizer: str | None) -> Converted:
    """An open_clip hub folder: open_clip_config.json (model_cfg, preprocess_cfg) + its weights."""
    raise ConvertError(f"{checkpoint}: open_clip hub folders are not supported yet")


def open_clip_training(checkpoint: str, model_config: str | None, allow_pickle: bool,
                       tokenizer: str | None) -> Converted:
    """An open_clip training checkpoint (epoch_N.pt: {"state_dict": ...}) with the model config it was trained with."""
    raise ConvertError(f"{checkpoint}: open_clip training checkpoints are not supported yet")
