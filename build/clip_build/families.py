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
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .convert import (
    IGNORED,
    PROCESSOR_CONFIG,
    Converted,
    ConvertError,
    KeyMappingError,
    Mapping_,
    _clip_layers,
    _linear,
    _norm,
    _source_name,
    check_leftovers,
    image_settings,
    load_state_dict,
    take,
)

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
    return {
        "vocab_size": t["vocab_size"],
        "max_position_embeddings": t["max_position_embeddings"],
        "hidden_size": t["hidden_size"],
        "num_hidden_layers": t["num_hidden_layers"],
        "num_attention_heads": t["num_attention_heads"],
        "intermediate_size": t["intermediate_size"],
        "hidden_act": t["hidden_act"],
        "layer_norm_eps": t["layer_norm_eps"],
        "eos_token_id": int(t.get("eos_token_id") or 1),
        "causal": False,
        "pool": "last",
        "proj_bias": True,
    }


def _siglip_vision_cfg(v: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "image_size": v["image_size"],
        "patch_size": v["patch_size"],
        "num_channels": v.get("num_channels", 3),
        "hidden_size": v["hidden_size"],
        "num_hidden_layers": v["num_hidden_layers"],
        "num_attention_heads": v["num_attention_heads"],
        "intermediate_size": v["intermediate_size"],
        "hidden_act": v["hidden_act"],
        "layer_norm_eps": v["layer_norm_eps"],
        "class_token": False,
        "patch_bias": True,
        "pre_norm": False,
        "pool": "map",
    }


def _siglip_text_mapping(cfg: Mapping[str, Any], projection_dim: int, hf: str = "text_model.") -> Mapping_:
    h = cfg["hidden_size"]
    m: Mapping_ = {
        f"{hf}embeddings.token_embedding.weight": ("text.token_embedding.weight", (cfg["vocab_size"], h)),
        f"{hf}embeddings.position_embedding.weight": (
            "text.position_embedding.weight",
            (cfg["max_position_embeddings"], h),
        ),
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
        f"{hf}embeddings.position_embedding.weight": (
            "vision.position_embedding.weight",
            ((cfg["image_size"] // p) ** 2, h),
        ),
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
            "(model_type siglip, e.g. google/siglip2-base-patch16-224) are supported"
        )
    from transformers import SiglipConfig

    conf = SiglipConfig.from_pretrained(str(src))
    tconf, vconf = conf.text_config.to_dict(), conf.vision_config.to_dict()
    if not vconf.get("vision_use_head", True):
        raise ConvertError(
            f"{checkpoint}: vision_use_head=false: the image tower has no pooling head, so "
            "SiglipModel gives no image embedding to serve"
        )
    text_cfg, vision_cfg = _siglip_text_cfg(tconf), _siglip_vision_cfg(vconf)
    projection_dim = int(tconf.get("projection_size") or tconf["hidden_size"])
    if projection_dim != vision_cfg["hidden_size"]:
        raise ConvertError(
            f"{checkpoint}: text projection_size {projection_dim} != vision hidden_size "
            f"{vision_cfg['hidden_size']}: the embeddings could not be compared"
        )
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
        family="siglip",
        text=text,
        vision=vision,
        text_arch="clip_text",
        pooling="last",
        text_cfg=text_cfg,
        vision_cfg=vision_cfg,
        projection_dim=projection_dim,
        logit_scale=scale_bias["logit_scale"],
        logit_bias=scale_bias["logit_bias"],
        scoring="sigmoid",
        write_tokenizer=lambda out: write_fixed_length_tokenizer(src, out, max_positions),
        image=image_settings(src, vision_cfg, warnings, siglip_image_defaults(vision_cfg["image_size"])),
        sources={"text": str(checkpoint), "vision": str(checkpoint)},
        source_name=_source_name(checkpoint),
        side_files=[p for p in [src / "preprocessor_config.json", src / PROCESSOR_CONFIG] if p.is_file()],
        warnings=warnings,
    )


def siglip_image_defaults(size: int) -> dict[str, Any]:
    """SiglipImageProcessor's defaults: squash to size x size (bicubic), rescale 1/255, mean and std 0.5."""
    return {"size": {"height": size, "width": size}, "resample": 3, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


def write_fixed_length_tokenizer(src: Path, out: Path, max_positions: int) -> dict[str, Any]:
    """The tokenizer of a tower run on rows padded to its context length (SigLIP: padding="max_length", no mask).

    SiglipTokenizer (SentencePiece, no fast version): spiece.model + its special tokens (tokenizer_settings.json),
    served by clip_runtime.text.SiglipSentencePiece. A fast tokenizer (SigLIP 2's Gemma): tokenizer.json.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(src))
    except Exception as e:
        raise ConvertError(
            f"{src}: cannot load its tokenizer ({type(e).__name__}: {e}); SigLIP's needs spiece.model "
            "and the sentencepiece package"
        ) from e
    if tok.pad_token_id is None:
        raise ConvertError(f"{src}: the tokenizer has no pad token")
    side = getattr(tok, "padding_side", "right")
    if side not in ("right", "left"):
        raise ConvertError(f"{src}: the tokenizer's padding_side {side!r} is not supported (right or left)")
    limits = [max_positions] + ([int(tok.model_max_length)] if 0 < (tok.model_max_length or 0) < 1_000_000 else [])
    out.mkdir(parents=True, exist_ok=True)
    block = {
        "dir": "tokenizer",
        "max_length": min(limits),
        "pad_token_id": int(tok.pad_token_id),
        "padding": "max_length",
    }
    if type(tok).__name__ == "SiglipTokenizer":
        if side != "right":
            raise ConvertError(f"{src}: SiglipTokenizer padding on the {side} is not supported")
        shutil.copy2(tok.vocab_file, out / "spiece.model")
        special = [
            {"content": str(t.content), "id": int(i), "lstrip": bool(t.lstrip), "rstrip": bool(t.rstrip)}
            for i, t in sorted(tok.added_tokens_decoder.items())
        ]
        settings = {
            "eos_token": str(tok.eos_token),
            "unk_token": str(tok.unk_token),
            "do_lower_case": bool(getattr(tok, "do_lower_case", True)),
            "special": special,
        }
        (out / "tokenizer_settings.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        return {**block, "kind": "siglip_spm", "file": "spiece.model", "settings": "tokenizer_settings.json"}
    tok.save_pretrained(str(out))
    if not (out / "tokenizer.json").is_file():
        raise ConvertError(
            f"{src}: its tokenizer ({type(tok).__name__}) has no fast version and is not "
            "SiglipTokenizer: tokenizer.json is required"
        )
    (out / "tokenizer_settings.json").write_text(json.dumps({"padding_side": side}) + "\n", encoding="utf-8")
    return {**block, "kind": "tokenizers_fixed", "file": "tokenizer.json", "settings": "tokenizer_settings.json"}


# ----------------------------------------------------------------------------------------------------- open_clip
def is_training_checkpoint(checkpoint: str) -> bool:
    """A file such as epoch_3.pt (open_clip's training output) rather than a folder or hub id."""
    path = Path(checkpoint).expanduser()
    return path.is_file() and path.suffix in (".pt", ".pth", ".bin", ".safetensors")


OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# open_clip config keys whose non-default values change the towers in ways the served modules do not implement
_UNSUPPORTED_VISION = {
    "ls_init_value": None,
    "attentional_pool": False,
    "patch_dropout_eval": None,
    "pos_embed_type": "learnable",
    "act_kwargs": None,
    "block_type": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
}
_UNSUPPORTED_TEXT = {
    "ls_init_value": None,
    "embed_cls": False,
    "act_kwargs": None,
    "block_type": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
    "hf_model_name": None,
}
SUPPORTED_OPEN_CLIP = (
    "open_clip's own ViT (class token, pool_type tok or avg, with or without ln_pre) and text "
    "transformer (causal or not; argmax, eos, first or last pooling; linear projection with or "
    "without bias), GELU or QuickGELU, any width/depth/patch size and square image size"
)


def _refuse_unsupported(cfg: Mapping[str, Any], defaults: Mapping[str, Any], tower: str, where: str) -> None:
    odd = {k: cfg[k] for k, default in defaults.items() if k in cfg and cfg[k] != default}
    if odd:
        raise ConvertError(f"{where}: {tower} tower options not supported: {odd}; supported: {SUPPORTED_OPEN_CLIP}")


def _square(size: Any, where: str) -> int:
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ConvertError(f"{where}: image_size {size} is not square; the served image encoder is square")
        size = size[0]
    return int(size)


def open_clip_tower_configs(model_cfg: Mapping[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any], int]:
    """open_clip's model_cfg -> (our text config, our vision config, embed_dim); ConvertError naming what is not
    supported (timm or Hugging Face towers, ResNets, layer scale, CoCa attention pooling...)."""
    v, t = dict(model_cfg.get("vision_cfg") or {}), dict(model_cfg.get("text_cfg") or {})
    if v.get("timm_model_name"):
        raise ConvertError(
            f"{where}: vision tower timm_model_name={v['timm_model_name']!r} is a timm model, not "
            f"supported (timm is not a serving dependency); supported: {SUPPORTED_OPEN_CLIP}"
        )
    if isinstance(v.get("layers", 12), (list, tuple)):
        raise ConvertError(
            f"{where}: the vision tower is a ModifiedResNet (layers {v['layers']}), not supported; "
            f"supported: {SUPPORTED_OPEN_CLIP}"
        )
    if t.get("hf_model_name"):
        raise ConvertError(
            f"{where}: text tower hf_model_name={t['hf_model_name']!r} (a Hugging Face encoder) is not "
            f"supported; supported: {SUPPORTED_OPEN_CLIP}"
        )
    _refuse_unsupported(v, _UNSUPPORTED_VISION, "vision", where)
    _refuse_unsupported(t, _UNSUPPORTED_TEXT, "text", where)
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"  # nn.GELU: the exact erf form
    embed_dim = int(model_cfg["embed_dim"])
    vw = int(v.get("width", 768))
    pool = {"tok": "cls", "avg": "avg"}.get(v.get("pool_type", "tok"))
    if pool is None:
        raise ConvertError(f"{where}: vision pool_type {v.get('pool_type')!r} not supported (tok or avg)")
    vision = {
        "image_size": _square(v.get("image_size", 224), where),
        "patch_size": int(v.get("patch_size", 16)),
        "num_channels": 3,
        "hidden_size": vw,
        "num_hidden_layers": int(v.get("layers", 12)),
        "num_attention_heads": vw // int(v.get("head_width", 64)),
        "intermediate_size": int(vw * float(v.get("mlp_ratio", 4.0))),
        "hidden_act": act,
        "layer_norm_eps": float((v.get("norm_kwargs") or {}).get("eps", 1e-5)),
        "class_token": True,
        "patch_bias": False,
        "pre_norm": not v.get("no_ln_pre", False),
        "pool": pool,
        "final_ln_after_pool": bool(v.get("final_ln_after_pool", False)),
    }
    tw = int(t.get("width", 512))
    text_pool = t.get("pool_type", "argmax")
    if text_pool not in ("argmax", "eos", "first", "last"):
        raise ConvertError(f"{where}: text pool_type {text_pool!r} not supported (argmax, eos, first, last)")
    if t.get("proj_type", "linear") not in ("linear", "none"):
        raise ConvertError(f"{where}: text proj_type {t.get('proj_type')!r} not supported (linear or none)")
    text = {
        "vocab_size": int(t.get("vocab_size", 49408)),
        "max_position_embeddings": int(t.get("context_length", 77)),
        "hidden_size": tw,
        "num_hidden_layers": int(t.get("layers", 12)),
        "num_attention_heads": int(t.get("heads", 8)),
        "intermediate_size": int(tw * float(t.get("mlp_ratio", 4.0))),
        "hidden_act": act,
        "layer_norm_eps": float((t.get("norm_kwargs") or {}).get("eps", 1e-5)),
        "eos_token_id": int(t.get("eos_id", 2)),
        "causal": not t.get("no_causal_mask", False),
        "pool": text_pool,
        "proj_bias": bool(t.get("proj_bias", False)),
        "proj_type": t.get("proj_type", "linear"),
        "pad_id": int(t.get("pad_id", 0)),
    }
    return text, vision, embed_dim


def _open_clip_blocks(m: Mapping_, oc: str, ours: str, cfg: Mapping[str, Any]) -> list[str]:
    """open_clip ResidualAttentionBlocks (nn.MultiheadAttention, ln_1/ln_2, mlp.c_fc/c_proj) -> our PreLNBlocks;
    returns the fused in_proj prefixes to split."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    fused = []
    for i in range(cfg["num_hidden_layers"]):
        a, b = f"{oc}transformer.resblocks.{i}", f"{ours}layers.{i}"
        _norm(m, f"{a}.ln_1", f"{b}.ln1", h)
        _linear(m, f"{a}.attn.out_proj", f"{b}.attn.out", h, h)
        _norm(m, f"{a}.ln_2", f"{b}.ln2", h)
        _linear(m, f"{a}.mlp.c_fc", f"{b}.mlp.fc1", inter, h)
        _linear(m, f"{a}.mlp.c_proj", f"{b}.mlp.fc2", h, inter)
        fused.append((f"{a}.attn", f"{b}.attn"))
    return fused


def map_open_clip(
    sd: dict[str, Any], text_cfg: dict[str, Any], vision_cfg: dict[str, Any], embed_dim: int, source: str
) -> tuple[list, list, float, float | None]:
    """open_clip CLIP / CustomTextCLIP state dict -> (text tensors, vision tensors, logit_scale, logit_bias)."""
    tp = "text." if any(k.startswith("text.") for k in sd) else ""  # CustomTextCLIP keeps the text tower under text.
    th, vh, vp = text_cfg["hidden_size"], vision_cfg["hidden_size"], vision_cfg["patch_size"]
    tm: Mapping_ = {
        f"{tp}token_embedding.weight": ("text.token_embedding.weight", (text_cfg["vocab_size"], th)),
        f"{tp}positional_embedding": ("text.position_embedding.weight", (text_cfg["max_position_embeddings"], th)),
    }
    tfused = _open_clip_blocks(tm, tp, "text.", text_cfg)
    _norm(tm, f"{tp}ln_final", "text.final_ln", th)
    n = (vision_cfg["image_size"] // vp) ** 2 + 1
    vm: Mapping_ = {
        "visual.conv1.weight": ("vision.patch_embedding.weight", (vh, 3, vp, vp)),
        "visual.class_embedding": ("vision.class_embedding", (vh,)),
        "visual.positional_embedding": ("vision.position_embedding.weight", (n, vh)),
    }
    if vision_cfg["pre_norm"]:
        _norm(vm, "visual.ln_pre", "vision.pre_ln", vh)
    vfused = _open_clip_blocks(vm, "visual.", "vision.", vision_cfg)
    _norm(vm, "visual.ln_post", "vision.post_ln", vh)
    text, vision = take(sd, tm, source), take(sd, vm, source)
    for oc, ours in tfused:
        text += _split_in_proj(sd, oc, ours, th, source)
    for oc, ours in vfused:
        vision += _split_in_proj(sd, oc, ours, vh, source)
    if text_cfg["proj_type"] == "none":
        if embed_dim != th:
            raise ConvertError(f"{source}: proj_type none needs text width {th} == embed_dim {embed_dim}")
        text.append(("text_projection.weight", _identity(th)))
    elif text_cfg["proj_bias"]:
        text += take(
            sd,
            {
                f"{tp}text_projection.weight": ("text_projection.weight", (embed_dim, th)),
                f"{tp}text_projection.bias": ("text_projection.bias", (embed_dim,)),
            },
            source,
        )
    else:
        text += [
            ("text_projection.weight", t.T.contiguous())
            for _, t in take(sd, {f"{tp}text_projection": ("p", (th, embed_dim))}, source)
        ]
    vision += [
        ("visual_projection.weight", t.T.contiguous())
        for _, t in take(sd, {"visual.proj": ("p", (vh, embed_dim))}, source)
    ]
    if "logit_scale" not in sd:
        raise KeyMappingError(f"{source}: missing: logit_scale")
    logit_scale = float(sd.pop("logit_scale").reshape(-1)[0])
    logit_bias = float(sd.pop("logit_bias").reshape(-1)[0]) if "logit_bias" in sd else None
    check_leftovers(sd, source, IGNORED + (r"(text\.)?attn_mask",))
    return text, vision, logit_scale, logit_bias


_INTERPOLATIONS = {"bicubic": 3, "bilinear": 2, "nearest": 0}


def open_clip_image(preprocess_cfg: Mapping[str, Any], image_size: int, where: str) -> dict[str, Any]:
    """open_clip's preprocess_cfg (eval transform) -> the manifest's `image` block (torchvision's PIL semantics)."""
    from .convert import DEFAULT_MEAN, DEFAULT_STD

    p = dict(preprocess_cfg or {})
    size = _square(p.get("size", image_size), where)
    if size != image_size:
        raise ConvertError(f"{where}: preprocess_cfg size {size} != the vision tower's image_size {image_size}")
    interpolation = p.get("interpolation", "bicubic")
    if interpolation not in _INTERPOLATIONS:
        raise ConvertError(f"{where}: interpolation {interpolation!r} not supported ({', '.join(_INTERPOLATIONS)})")
    mode = p.get("resize_mode", "shortest")
    if mode == "shortest":  # Resize(size) keeping the aspect ratio, then CenterCrop(size)
        resize = {"resize_mode": "shortest_edge", "shortest_edge": size, "do_center_crop": True}
    elif mode == "squash":  # Resize((size, size))
        resize = {"resize_mode": "exact", "shortest_edge": None, "do_center_crop": False}
    elif mode == "longest":  # ResizeKeepRatio(longest=1), then CenterCropOrPad(fill=fill_color)
        resize = {"resize_mode": "longest", "shortest_edge": None, "do_center_crop": False}
    else:
        raise ConvertError(f"{where}: resize_mode {mode!r} not supported (shortest, longest or squash)")
    fill = p.get("fill_color", 0)
    if not isinstance(fill, int) or not 0 <= fill <= 255:
        raise ConvertError(f"{where}: fill_color {fill!r} not supported (one int 0..255)")
    resize["pad_fill"] = fill
    return {
        "size": size,
        "crop_size": size,
        "resize_size": size,
        **resize,
        "crop_rounding": "round",
        "resample": _INTERPOLATIONS[interpolation],
        "mean": [float(x) for x in p.get("mean", DEFAULT_MEAN)],
        "std": [float(x) for x in p.get("std", DEFAULT_STD)],
        "rescale_factor": 1 / 255,
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
    }


def _write_open_clip_hf_tokenizer(
    text_cfg: Mapping[str, Any], hf_name: str, clean: str, tokenizer_dir: Path | None, out: Path, where: str
) -> dict[str, Any]:
    """open_clip's HFTokenizer: the named Hugging Face tokenizer (from --tokenizer DIR, the checkpoint folder, a
    local path, or the hub), its cleaning, padding="max_length" to the context length."""
    from transformers import AutoTokenizer

    from .convert import resolve_checkpoint

    src = tokenizer_dir or (Path(hf_name).expanduser() if Path(hf_name).expanduser().is_dir() else None)
    try:
        tok = AutoTokenizer.from_pretrained(str(src or resolve_checkpoint(hf_name)))
    except Exception as e:
        raise ConvertError(
            f"{where}: cannot load hf_tokenizer_name {hf_name!r} ({type(e).__name__}: {e}); give "
            "--tokenizer DIR with its files"
        ) from e
    if tok.pad_token_id is None:
        raise ConvertError(f"{where}: tokenizer {hf_name!r} has no pad token")
    if len(tok) > text_cfg["vocab_size"]:
        raise ConvertError(
            f"{where}: tokenizer {hf_name!r} has {len(tok)} tokens, more than the text tower's "
            f"vocab_size {text_cfg['vocab_size']}"
        )
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    if not (out / "tokenizer.json").is_file():
        raise ConvertError(f"{where}: tokenizer {hf_name!r} has no fast version (tokenizer.json is required)")
    side = getattr(tok, "padding_side", "right")
    (out / "tokenizer_settings.json").write_text(
        json.dumps({"clean": clean, "padding_side": side}) + "\n", encoding="utf-8"
    )
    return {
        "dir": "tokenizer",
        "kind": "open_clip_hf",
        "file": "tokenizer.json",
        "settings": "tokenizer_settings.json",
        "max_length": int(text_cfg["max_position_embeddings"]),
        "pad_token_id": int(tok.pad_token_id),
        "padding": "max_length",
    }


def write_open_clip_tokenizer(
    text_cfg: Mapping[str, Any],
    raw_text_cfg: Mapping[str, Any],
    out: Path,
    where: str,
    tokenizer_dir: Path | None = None,
) -> dict[str, Any]:
    """open_clip's default tokenizer: OpenAI's BPE (bpe_simple_vocab_16e6.txt.gz from the pinned open_clip_torch
    wheel), ftfy + HTML unescape + whitespace clean + lower-case, [SOT] text [EOT], pad id 0, context length."""
    import zipfile

    from .synthetic import BPE_MEMBER, open_clip_wheel

    kwargs = raw_text_cfg.get("tokenizer_kwargs") or {}
    hf_name = raw_text_cfg.get("hf_tokenizer_name")
    clean = kwargs.get("clean", "whitespace" if hf_name else "lower")
    odd = {k: v for k, v in kwargs.items() if k != "clean" and v}
    if clean not in ("lower", "whitespace", "canonicalize") or odd or raw_text_cfg.get("tokenizer_mode"):
        raise ConvertError(
            f"{where}: tokenizer options {kwargs} / tokenizer_mode "
            f"{raw_text_cfg.get('tokenizer_mode')!r} not supported (clean: lower, whitespace or "
            "canonicalize)"
        )
    if hf_name:
        return _write_open_clip_hf_tokenizer(text_cfg, hf_name, clean, tokenizer_dir, out, where)
    if text_cfg["vocab_size"] != 49408:
        raise ConvertError(
            f"{where}: vocab_size {text_cfg['vocab_size']} does not match open_clip's BPE (49408) and "
            "no hf_tokenizer_name is given"
        )
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(open_clip_wheel()) as zf:
        (out / "bpe_simple_vocab_16e6.txt.gz").write_bytes(zf.read(BPE_MEMBER))
    settings = {"clean": clean, "pad_id": int(text_cfg["pad_id"])}
    (out / "tokenizer_settings.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    kind = "open_clip_bpe" if text_cfg["causal"] else "open_clip_bpe_fixed"
    return {
        "dir": "tokenizer",
        "kind": kind,
        "file": "bpe_simple_vocab_16e6.txt.gz",
        "settings": "tokenizer_settings.json",
        "max_length": int(text_cfg["max_position_embeddings"]),
        "pad_token_id": int(text_cfg["pad_id"]),
        "padding": "longest" if text_cfg["causal"] else "max_length",
    }


def _open_clip_converted(
    checkpoint: str,
    model_cfg: Mapping[str, Any],
    preprocess_cfg: Mapping[str, Any],
    sd: dict[str, Any],
    family: str,
    source: str,
    tokenizer_dir: Path | None = None,
) -> Converted:
    text_cfg, vision_cfg, embed_dim = open_clip_tower_configs(model_cfg, source)
    if not text_cfg["causal"] and text_cfg["pool"] not in ("last", "first"):
        log.debug("bidirectional text tower pooled at %s", text_cfg["pool"])
    image = open_clip_image(preprocess_cfg, vision_cfg["image_size"], source)
    text, vision, logit_scale, logit_bias = map_open_clip(sd, text_cfg, vision_cfg, embed_dim, source)
    raw_text = dict(model_cfg.get("text_cfg") or {})
    return Converted(
        family=family,
        text=text,
        vision=vision,
        text_arch="clip_text",
        pooling=text_cfg["pool"],
        text_cfg=text_cfg,
        vision_cfg=vision_cfg,
        projection_dim=embed_dim,
        logit_scale=logit_scale,
        logit_bias=logit_bias,
        scoring="sigmoid" if logit_bias is not None else "softmax",
        write_tokenizer=lambda out: write_open_clip_tokenizer(text_cfg, raw_text, out, source, tokenizer_dir),
        image=image,
        sources={"text": str(checkpoint), "vision": str(checkpoint)},
        source_name=_source_name(checkpoint),
    )


def _strip_module(sd: dict[str, Any]) -> dict[str, Any]:
    """DistributedDataParallel's `module.` prefix off every key (open_clip's training checkpoints keep it)."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def open_clip_hub(checkpoint: str, src: Path, allow_pickle: bool, tokenizer: str | None) -> Converted:
    """An open_clip hub folder: open_clip_config.json (model_cfg, preprocess_cfg) + its weights."""
    from safetensors.torch import load_file

    where = str(src / OPEN_CLIP_CONFIG)
    cfg = json.loads((src / OPEN_CLIP_CONFIG).read_text(encoding="utf-8"))
    if "model_cfg" not in cfg:
        raise ConvertError(f"{where}: no model_cfg (open_clip hub configs hold model_cfg and preprocess_cfg)")
    tok_dir = _tokenizer_dir(tokenizer, src)
    if (src / OPEN_CLIP_WEIGHTS[0]).is_file():
        sd = load_file(str(src / OPEN_CLIP_WEIGHTS[0]))
    elif (src / OPEN_CLIP_WEIGHTS[1]).is_file():
        sd = _load_pickle(src / OPEN_CLIP_WEIGHTS[1], allow_pickle)
    else:
        raise ConvertError(
            f"{src}: an open_clip hub folder needs {OPEN_CLIP_WEIGHTS[0]} or {OPEN_CLIP_WEIGHTS[1]} "
            "beside open_clip_config.json"
        )
    return _open_clip_converted(
        checkpoint, cfg["model_cfg"], cfg.get("preprocess_cfg") or {}, _strip_module(sd), "open_clip", str(src), tok_dir
    )


def _tokenizer_dir(tokenizer: str | None, folder: Path | None) -> Path | None:
    """--tokenizer DIR, else the checkpoint folder when it holds a tokenizer (hf_tokenizer_name's files)."""
    if tokenizer:
        path = Path(tokenizer).expanduser()
        if not path.is_dir():
            raise ConvertError(f"--tokenizer {tokenizer}: no such folder")
        return path
    if folder is not None and any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        return folder
    return None


def _load_pickle(path: Path, allow_pickle: bool) -> dict[str, Any]:
    if not allow_pickle:
        raise ConvertError(
            f"{path}: pickle checkpoints can run arbitrary code when loaded; convert it to "
            "safetensors, or pass --allow-pickle if you trust its source"
        )
    import torch

    log.warning("loading pickle checkpoint %s (--allow-pickle)", path)
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict):
        raise ConvertError(f"{path}: expected a state dict or {{'state_dict': ...}}, got {type(obj).__name__}")
    return sd


def open_clip_model_config(name_or_file: str) -> dict[str, Any]:
    """An open_clip model config: a JSON file, or a name from open_clip's model_configs/ (read from the pinned
    open_clip_torch wheel); a `-quickgelu` suffix sets quick_gelu as open_clip does."""
    import zipfile

    from .synthetic import open_clip_wheel

    path = Path(name_or_file).expanduser()
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise ConvertError(f"--model-config {name_or_file}: no such file")
        cfg = json.loads(path.read_text(encoding="utf-8"))
        return cfg.get("model_cfg", cfg)
    with zipfile.ZipFile(open_clip_wheel()) as zf:
        names = {Path(n).stem: n for n in zf.namelist() if n.startswith("open_clip/model_configs/")}
        base = name_or_file
        if base not in names and base.lower().endswith("-quickgelu"):
            base = base[: -len("-quickgelu")]
        if base not in names:
            close = [n for n in sorted(names) if n.lower().startswith(name_or_file.lower()[:5])][:10]
            raise ConvertError(
                f"--model-config {name_or_file!r}: not one of open_clip's model configs "
                f"(e.g. {', '.join(close) or 'ViT-B-32'}) and not a JSON file"
            )
        cfg = json.loads(zf.read(names[base]))
    if base != name_or_file:
        cfg["quick_gelu"] = True
    return cfg


def open_clip_training(
    checkpoint: str, model_config: str | None, allow_pickle: bool, tokenizer: str | None
) -> Converted:
    """An open_clip training checkpoint (epoch_N.pt: {"state_dict": ...}) with the model config it was trained with."""
    from safetensors.torch import load_file

    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise ConvertError(
            f"{checkpoint}: --model-config is for open_clip training checkpoints (a file such as "
            "epoch_32.pt); no such file"
        )
    if not model_config:
        raise ConvertError(
            f"{checkpoint}: an open_clip training checkpoint carries no config: give --model-config "
            "with the open_clip model name it was trained with (e.g. ViT-B-32) or a JSON file"
        )
    cfg = open_clip_model_config(model_config)
    sd = load_file(str(path)) if path.suffix == ".safetensors" else _load_pickle(path, allow_pickle)
    return _open_clip_converted(
        checkpoint,
        cfg,
        cfg.get("preprocess_cfg") or {},
        _strip_module(sd),
        "open_clip",
        str(path),
        _tokenizer_dir(tokenizer, None),
    )
