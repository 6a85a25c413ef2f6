"""`clip-triton convert`: a Hugging Face checkpoint -> WEIGHTS_DIR (Parquet weights + manifest.json + tokenizer/).

Families (from config.json's model_type):
  clip          CLIP text transformer (EOT pooling) + ViT, from one checkpoint.
  chinese_clip  BERT text tower (CLS pooling) + ViT, from one checkpoint.
  bert_vit      composite: a BERT checkpoint (--checkpoint, model_type bert; mean pooling unless its
                sentence-transformers 1_Pooling config says CLS) + the ViT tower, visual_projection and logit_scale
                of a CLIP checkpoint (--vision-checkpoint) + a text projection hidden -> projection_dim (no bias)
                from --projections (safetensors, key `text_projection.weight`) or, without it, freshly initialised.

Key mapping is explicit and strict: every expected tensor must be present with the shape its config implies, and
any tensor left over is an error unless it matches IGNORED below.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .weights import FORMAT_VERSION, WeightsError, compute_model_id, sha256_file, write_manifest, write_parquet

log = logging.getLogger(__name__)

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLES = ("pytorch_model.bin", "model.pt", "pytorch_model.pt", "model.bin")
# Tensors a checkpoint may carry that the pooled embeddings never use (regex, full match on the HF key).
IGNORED = (
    r".*\.position_ids",  # buffers saved by older transformers
    r".*\.token_type_ids",  # buffer
    r"(text_model\.|bert\.)?pooler\.dense\.(weight|bias)",  # BERT pooler: our pooling reads hidden states
    r"cls\..*",  # BERT pre-training heads (MLM / NSP)
)
# For bert_vit only the vision half of the CLIP checkpoint is used.
VISION_ONLY_IGNORED = (r"text_model\..*", r"text_projection\.weight")
TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "sentencepiece.bpe.model",
    "spiece.model",
)
CONFIG_NOISE = (
    "id2label",
    "label2id",
    "architectures",
    "transformers_version",
    "_name_or_path",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "problem_type",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "dtype",
    "torch_dtype",
)
DEFAULT_MEAN = [0.48145466, 0.4578275, 0.40821073]
DEFAULT_STD = [0.26862954, 0.26130258, 0.27577711]


class ConvertError(WeightsError):
    """The checkpoint cannot be converted (unsupported layout, missing files, refused pickle...)."""


class KeyMappingError(ConvertError):
    """A checkpoint's tensors do not match the expected keys or shapes."""


# ----------------------------------------------------------------------------------------------- checkpoint access
def resolve_checkpoint(src: str, allow_pickle: bool = False) -> Path:
    """A local HF-layout folder, or a hub id fetched with huggingface_hub.snapshot_download."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConvertError(f"{src}: expected a checkpoint folder (config.json + model.safetensors), got a file")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", src):
        raise ConvertError(f"{src}: no such folder, and not a Hugging Face hub id")
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model"] + (["*.bin", "*.pt"] if allow_pickle else [])
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(src, allow_patterns=patterns))
    except Exception as e:  # network, auth, missing repo: one clear message
        raise ConvertError(f"{src}: not a local folder and could not be fetched from the Hugging Face hub ({e})") from e


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a checkpoint folder."""
    path = folder / "config.json"
    if not path.is_file():
        raise ConvertError(f"{folder}: no config.json")
    return json.loads(path.read_text(encoding="utf-8"))


def load_state_dict(folder: Path, allow_pickle: bool = False) -> dict[str, Any]:
    """All tensors of a checkpoint: model.safetensors (or its sharded index); pickles only with allow_pickle."""
    from safetensors.torch import load_file

    if (folder / SAFETENSORS).is_file():
        return load_file(str(folder / SAFETENSORS))
    if (folder / SAFETENSORS_INDEX).is_file():
        index = json.loads((folder / SAFETENSORS_INDEX).read_text(encoding="utf-8"))
        sd: dict[str, Any] = {}
        for shard in sorted(set(index["weight_map"].values())):
            sd.update(load_file(str(folder / shard)))
        return sd
    pickles = [folder / p for p in PICKLES if (folder / p).is_file()]
    if pickles and not allow_pickle:
        raise ConvertError(
            f"{pickles[0]}: pickle checkpoints can run arbitrary code when loaded; convert it to "
            "safetensors, or pass --allow-pickle if you trust its source"
        )
    if pickles:
        import torch

        log.warning("loading pickle checkpoint %s (--allow-pickle)", pickles[0])
        obj = torch.load(str(pickles[0]), map_location="cpu", weights_only=True)
        return obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    raise ConvertError(f"{folder}: no {SAFETENSORS} (or {SAFETENSORS_INDEX})")


# ------------------------------------------------------------------------------------------------- key mappings
Mapping_ = dict[str, tuple[str, tuple[int, ...]]]  # HF key -> (our key, expected shape)


def _linear(m: Mapping_, hf: str, ours: str, out_f: int, in_f: int, bias: bool = True) -> None:
    m[f"{hf}.weight"] = (f"{ours}.weight", (out_f, in_f))
    if bias:
        m[f"{hf}.bias"] = (f"{ours}.bias", (out_f,))


def _norm(m: Mapping_, hf: str, ours: str, n: int) -> None:
    m[f"{hf}.weight"] = (f"{ours}.weight", (n,))
    m[f"{hf}.bias"] = (f"{ours}.bias", (n,))


def _clip_layers(m: Mapping_, hf: str, ours: str, cfg: Mapping[str, Any]) -> None:
    """CLIP pre-LN encoder layers: encoder.layers.{i}.(self_attn|layer_norm1|mlp|layer_norm2)."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    for i in range(cfg["num_hidden_layers"]):
        a, b = f"{hf}encoder.layers.{i}", f"{ours}layers.{i}"
        for proj, name in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("out_proj", "out")):
            _linear(m, f"{a}.self_attn.{proj}", f"{b}.attn.{name}", h, h)
        _norm(m, f"{a}.layer_norm1", f"{b}.ln1", h)
        _norm(m, f"{a}.layer_norm2", f"{b}.ln2", h)
        _linear(m, f"{a}.mlp.fc1", f"{b}.mlp.fc1", inter, h)
        _linear(m, f"{a}.mlp.fc2", f"{b}.mlp.fc2", h, inter)


def clip_text_mapping(cfg: Mapping[str, Any], projection_dim: int, hf: str = "text_model.") -> Mapping_:
    """HF CLIPTextTransformer + text_projection -> our ClipTextTransformer under `text.`."""
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
    m["text_projection.weight"] = ("text_projection.weight", (projection_dim, h))
    return m


def bert_mapping(cfg: Mapping[str, Any], hf: str) -> Mapping_:
    """HF BertModel / ChineseCLIPTextModel (without pooler) -> our BertEncoder under `text.`."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    e = f"{hf}embeddings"
    m: Mapping_ = {
        f"{e}.word_embeddings.weight": ("text.word_embedding.weight", (cfg["vocab_size"], h)),
        f"{e}.position_embeddings.weight": ("text.position_embedding.weight", (cfg["max_position_embeddings"], h)),
        f"{e}.token_type_embeddings.weight": ("text.token_type_embedding.weight", (cfg.get("type_vocab_size", 2), h)),
    }
    _norm(m, f"{e}.LayerNorm", "text.embed_ln", h)
    for i in range(cfg["num_hidden_layers"]):
        a, b = f"{hf}encoder.layer.{i}", f"text.layers.{i}"
        _linear(m, f"{a}.attention.self.query", f"{b}.attn.q", h, h)
        _linear(m, f"{a}.attention.self.key", f"{b}.attn.k", h, h)
        _linear(m, f"{a}.attention.self.value", f"{b}.attn.v", h, h)
        _linear(m, f"{a}.attention.output.dense", f"{b}.attn.out", h, h)
        _norm(m, f"{a}.attention.output.LayerNorm", f"{b}.ln1", h)
        _linear(m, f"{a}.intermediate.dense", f"{b}.mlp.fc1", inter, h)
        _linear(m, f"{a}.output.dense", f"{b}.mlp.fc2", h, inter)
        _norm(m, f"{a}.output.LayerNorm", f"{b}.ln2", h)
    return m


def vit_mapping(cfg: Mapping[str, Any], projection_dim: int, hf: str = "vision_model.") -> Mapping_:
    """HF CLIPVisionTransformer + visual_projection -> our VisionTransformer under `vision.`."""
    h, p, c = cfg["hidden_size"], cfg["patch_size"], cfg.get("num_channels", 3)
    n = (cfg["image_size"] // p) ** 2 + 1
    m: Mapping_ = {
        f"{hf}embeddings.class_embedding": ("vision.class_embedding", (h,)),
        f"{hf}embeddings.patch_embedding.weight": ("vision.patch_embedding.weight", (h, c, p, p)),
        f"{hf}embeddings.position_embedding.weight": ("vision.position_embedding.weight", (n, h)),
    }
    _norm(m, f"{hf}pre_layrnorm", "vision.pre_ln", h)
    _clip_layers(m, hf, "vision.", cfg)
    _norm(m, f"{hf}post_layernorm", "vision.post_ln", h)
    m["visual_projection.weight"] = ("visual_projection.weight", (projection_dim, h))
    return m


def take(sd: dict[str, Any], mapping: Mapping_, source: str) -> list[tuple[str, Any]]:
    """Pop every mapped tensor from sd (renamed, shape-checked); raise KeyMappingError listing all problems."""
    missing = [k for k in mapping if k not in sd]
    bad = [
        f"{k}: {tuple(sd[k].shape)} != expected {shape}"
        for k, (_, shape) in mapping.items()
        if k in sd and tuple(sd[k].shape) != shape
    ]
    if missing or bad:
        lines = [f"missing: {k}" for k in missing[:20]] + [f"wrong shape: {b}" for b in bad[:20]]
        more = len(missing) + len(bad) - len(lines)
        raise KeyMappingError(
            f"{source}: checkpoint does not match its config:\n  "
            + "\n  ".join(lines)
            + (f"\n  ... and {more} more" if more > 0 else "")
        )
    return [(ours, sd.pop(k)) for k, (ours, _) in mapping.items()]


def check_leftovers(sd: Mapping[str, Any], source: str, ignored: tuple[str, ...] = IGNORED) -> list[str]:
    """Raise KeyMappingError for tensors neither mapped nor ignored; return the ignored names."""
    unexpected = sorted(k for k in sd if not any(re.fullmatch(p, k) for p in ignored))
    if unexpected:
        raise KeyMappingError(
            f"{source}: {len(unexpected)} unexpected tensor(s) not used by the model: "
            + ", ".join(unexpected[:20])
            + (" ..." if len(unexpected) > 20 else "")
        )
    return sorted(sd)


# ---------------------------------------------------------------------------------------------- side files
def _clean_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Tower config without transformers' bookkeeping; projection_dim lives at the manifest's top level."""
    return {k: v for k, v in cfg.items() if k not in CONFIG_NOISE and k != "projection_dim"}


def _full_configs(folder: Path) -> Any:
    """transformers' config object (defaults filled in)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder))


def _sbert_max_length(folder: Path) -> int | None:
    path = folder / "sentence_bert_config.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8")).get("max_seq_length")
    return None


def _bert_pooling(folder: Path) -> str:
    """mean, unless a sentence-transformers 1_Pooling/config.json asks for the CLS token."""
    path = folder / "1_Pooling" / "config.json"
    if path.is_file():
        cfg = json.loads(path.read_text(encoding="utf-8"))
        if cfg.get("pooling_mode_cls_token"):
            return "cls"
        if not cfg.get("pooling_mode_mean_tokens", True):
            raise ConvertError(f"{path}: only CLS or mean pooling is supported")
    return "mean"


def write_tokenizer(src: Path, out: Path, max_positions: int) -> dict[str, Any]:
    """Save the HF fast tokenizer and the raw tokenizer files into out; return manifest['tokenizer']."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(src))
    except Exception as e:
        raise ConvertError(f"{src}: cannot load its tokenizer ({e})") from e
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (out / name).exists():
            shutil.copy2(src / name, out / name)
    if not (out / "tokenizer.json").is_file():
        raise ConvertError(f"{src}: its tokenizer has no fast (tokenizers) version; tokenizer.json is required")
    limits = [max_positions]
    if 0 < (tok.model_max_length or 0) < 1_000_000:
        limits.append(int(tok.model_max_length))
    if sbert := _sbert_max_length(src):
        limits.append(int(sbert))
    if tok.pad_token_id is None:
        raise ConvertError(f"{src}: the tokenizer has no pad token")
    return {"dir": "tokenizer", "max_length": min(limits), "pad_token_id": int(tok.pad_token_id)}


PROCESSOR_CONFIG = "processor_config.json"  # transformers 5 saves a processor's image settings here, nested


def read_image_processor(src: Path) -> tuple[dict[str, Any] | None, Path]:
    """The image processor's settings: preprocessor_config.json, else processor_config.json's "image_processor"."""
    path = src / "preprocessor_config.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8")), path
    if (src / PROCESSOR_CONFIG).is_file():
        block = json.loads((src / PROCESSOR_CONFIG).read_text(encoding="utf-8")).get("image_processor")
        if isinstance(block, dict):
            return block, src / PROCESSOR_CONFIG
    return None, path


def image_settings(
    src: Path, vision_cfg: Mapping[str, Any], warnings: list[str], defaults: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Preprocessing constants from preprocessor_config.json or processor_config.json (`defaults`, else CLIP's, with
    a warning, when absent).

    `size` is either {"shortest_edge": N} (keep the aspect ratio; CLIPImageProcessor) or {"height": H, "width": W}
    (resize to exactly HxW, ignoring the aspect ratio; ChineseCLIPImageProcessor's real configs): recorded as
    `resize_mode` "shortest_edge" (with `shortest_edge`) or "exact" (with `resize_size` = H = W, `shortest_edge` null).
    Settings the serving runtime cannot reproduce are refused here, with the flag named, rather than served wrong.
    """
    s = vision_cfg["image_size"]
    found, path = read_image_processor(src)
    if found is None:
        what = "the family's defaults" if defaults else f"CLIP's defaults (resize {s}, crop {s}, OpenAI mean/std)"
        _warn(warnings, f"{src}: no preprocessor_config.json or {PROCESSOR_CONFIG}; using {what}")
    p: dict[str, Any] = dict(defaults or {}) if found is None else found
    size = p.get("size", {"shortest_edge": s})
    if isinstance(size, int):
        size = {"shortest_edge": size}
    size = {k: v for k, v in size.items() if v is not None}
    crop = p.get("crop_size", {"height": s, "width": s})
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    # SiglipImageProcessor squashes to {"height", "width"} and has no crop: none unless the config names one
    do_crop = bool(p.get("do_center_crop", "crop_size" in p or set(size) != {"height", "width"}))
    flags = {k: bool(p.get(k, True)) for k in ("do_resize", "do_rescale", "do_normalize")}
    flags["do_convert_rgb"] = p.get("do_convert_rgb") is not False  # null: the processor's default (RGB)
    if not flags["do_resize"]:
        raise ConvertError(
            f"{path}: do_resize=false is not supported: the image encoder takes a fixed "
            f"{s}x{s} input, so every image must be resized"
        )
    if not flags["do_convert_rgb"]:
        _warn(
            warnings,
            f"{path}: do_convert_rgb=false; the server converts every image to RGB anyway (the vision "
            "tower takes 3 channels), which is what the checkpoint's processor gives for RGB images",
        )
    if set(size) == {"shortest_edge"}:
        mode, shortest, resize_size = "shortest_edge", int(size["shortest_edge"]), int(size["shortest_edge"])
    elif set(size) == {"height", "width"}:
        if size["height"] != size["width"]:
            raise ConvertError(f"{path}: size {size} is not square; only a square exact resize is supported")
        mode, shortest, resize_size = "exact", None, int(size["height"])
    else:
        raise ConvertError(
            f'{path}: size {size} is not supported (expected {{"shortest_edge": N}} or {{"height": N, "width": N}})'
        )
    if do_crop and (crop.get("height"), crop.get("width")) != (s, s):
        raise ConvertError(f"{path}: crop_size {crop} does not match the vision tower's image_size {s}")
    if not do_crop and mode == "shortest_edge":
        raise ConvertError(
            f"{path}: do_center_crop=false with size {size} keeps the aspect ratio, so images would "
            "not be square; the image encoder takes a fixed square input"
        )
    if not do_crop and resize_size != s:
        raise ConvertError(f"{path}: size {size} does not match the vision tower's image_size {s}")
    return {
        "size": s,
        "crop_size": int(crop.get("height", s)),
        "shortest_edge": shortest,
        "resize_mode": mode,
        "resize_size": resize_size,
        "do_center_crop": do_crop,
        "resample": int(p.get("resample", 3)),
        "mean": [float(x) for x in p.get("image_mean", DEFAULT_MEAN)],
        "std": [float(x) for x in p.get("image_std", DEFAULT_STD)],
        "rescale_factor": float(p.get("rescale_factor", 1 / 255)),
        **flags,
    }


def _warn(warnings: list[str], msg: str) -> None:
    log.warning("%s", msg)
    warnings.append(msg)


def _fresh_projection(out_f: int, in_f: int, seed: int) -> Any:
    """Seeded N(0, in_f**-0.5) init, as HF initialises CLIP's text_projection."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g) * in_f**-0.5


def _load_projection(path: Path, out_f: int, in_f: int) -> Any:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ConvertError(f"{path}: no such projections file")
    sd = load_file(str(path))
    ((_, t),) = take(sd, {"text_projection.weight": ("text_projection.weight", (out_f, in_f))}, str(path))
    check_leftovers(sd, str(path), ignored=())
    return t


# ---------------------------------------------------------------------------------------------------- convert
@dataclass
class Converted:
    """One checkpoint read and mapped onto our towers: what write_weights_dir puts into a WEIGHTS_DIR."""

    family: str
    text: list[tuple[str, Any]]  # (our key, tensor)
    vision: list[tuple[str, Any]]
    text_arch: str
    pooling: str
    text_cfg: dict[str, Any]
    vision_cfg: dict[str, Any]
    projection_dim: int
    logit_scale: float
    write_tokenizer: Callable[[Path], dict[str, Any]]  # tokenizer dir -> manifest["tokenizer"]
    image: dict[str, Any]  # manifest["image"]
    sources: dict[str, Any]
    source_name: str  # hub id or the folder's base name (clip_info's "source")
    logit_bias: float | None = None
    scoring: str = "softmax"
    side_files: list[Path] = field(default_factory=list)  # copied into WEIGHTS_DIR (preprocessor_config.json...)
    warnings: list[str] = field(default_factory=list)


def _source_name(checkpoint: str) -> str:
    path = Path(checkpoint).expanduser()
    return path.resolve().name if path.exists() else str(checkpoint)


def _hf_clip(
    checkpoint: str,
    src: Path,
    raw: dict[str, Any],
    vision_checkpoint: str | None,
    projections: str | None,
    allow_pickle: bool,
    seed: int,
) -> Converted:
    """transformers CLIPModel, ChineseCLIPModel, or a BERT + a CLIP checkpoint's ViT (bert_vit)."""
    model_type = raw.get("model_type")
    warnings: list[str] = []
    if model_type in ("clip", "chinese_clip"):
        if vision_checkpoint or projections:
            raise ConvertError(f"--vision-checkpoint/--projections apply only to a BERT --checkpoint, not {model_type}")
        family, vsrc = model_type, src
    else:
        if not vision_checkpoint:
            raise ConvertError(
                f"{checkpoint} is a BERT checkpoint: give --vision-checkpoint (a CLIP checkpoint) for "
                "the composite bert_vit family"
            )
        family = "bert_vit"
        vsrc = resolve_checkpoint(vision_checkpoint, allow_pickle)
        vraw = read_config(vsrc)
        if vraw.get("model_type") not in ("clip", "chinese_clip"):
            raise ConvertError(f"{vision_checkpoint}: model_type {vraw.get('model_type')!r}, expected clip")

    vconf = _full_configs(vsrc)
    vision_cfg = _clean_config(vconf.vision_config.to_dict())
    projection_dim = int(vconf.projection_dim)
    sd = load_state_dict(src, allow_pickle)
    vsd = sd if vsrc is src else load_state_dict(vsrc, allow_pickle)

    if family == "clip":
        text_cfg = _clean_config(vconf.text_config.to_dict())
        text_arch, pooling = "clip_text", "eot"
        text = take(sd, clip_text_mapping(text_cfg, projection_dim), str(src))
    elif family == "chinese_clip":
        text_cfg = _clean_config(vconf.text_config.to_dict())
        text_arch, pooling = "bert", "cls"
        text = take(sd, bert_mapping(text_cfg, "text_model."), str(src))
        text += take(
            sd,
            {"text_projection.weight": ("text_projection.weight", (projection_dim, text_cfg["hidden_size"]))},
            str(src),
        )
    else:
        text_cfg = _clean_config(_full_configs(src).to_dict())
        text_arch, pooling = "bert", _bert_pooling(src)
        prefix = "bert." if any(k.startswith("bert.") for k in sd) else ""
        text = take(sd, bert_mapping(text_cfg, prefix), str(src))
        text.append(
            (
                "text_projection.weight",
                _bert_projection(projections, projection_dim, text_cfg["hidden_size"], seed, warnings),
            )
        )
        check_leftovers(sd, str(src))

    vision = take(vsd, vit_mapping(vision_cfg, projection_dim), str(vsrc))
    if "logit_scale" not in vsd:
        raise KeyMappingError(f"{vsrc}: missing: logit_scale")
    logit_scale = float(vsd.pop("logit_scale"))
    check_leftovers(vsd, str(vsrc), IGNORED + (VISION_ONLY_IGNORED if family == "bert_vit" else ()))
    max_positions = int(text_cfg["max_position_embeddings"])
    return Converted(
        family=family,
        text=text,
        vision=vision,
        text_arch=text_arch,
        pooling=pooling,
        text_cfg=text_cfg,
        vision_cfg=vision_cfg,
        projection_dim=projection_dim,
        logit_scale=logit_scale,
        write_tokenizer=lambda out: write_tokenizer(src, out, max_positions),
        image=image_settings(vsrc, vision_cfg, warnings),
        sources={
            "text": str(checkpoint),
            "vision": str(vision_checkpoint or checkpoint),
            "projections": str(projections) if projections else None,
        },
        source_name=_source_name(checkpoint),
        side_files=[p for p in [vsrc / "preprocessor_config.json", vsrc / PROCESSOR_CONFIG] if p.is_file()],
        warnings=warnings,
    )


def _bert_projection(projections: str | None, projection_dim: int, hidden: int, seed: int, warnings: list[str]) -> Any:
    if projections:
        return _load_projection(Path(projections), projection_dim, hidden)
    _warn(
        warnings,
        f"no --projections given: the text projection {hidden}->{projection_dim} is RANDOMLY "
        f"initialised (seed {seed}); text and image embeddings are NOT aligned until it is trained",
    )
    return _fresh_projection(projection_dim, hidden, seed)


def write_weights_dir(out: str | Path, c: Converted) -> dict[str, Any]:
    """Parquet towers, tokenizer/, side files and manifest.json (last: a half-written WEIGHTS_DIR never looks valid)."""
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    files: dict[str, str] = {}
    text_meta = {"arch": c.text_arch, "pooling": c.pooling, "projection_dim": c.projection_dim, **c.text_cfg}
    # The Parquet files carry content only (tensors, configs): their sha256s make model_id, so identical weights
    # give identical ids however the checkpoint path was typed. Where they came from is in manifest.json alone.
    with tqdm(total=len(c.text) + len(c.vision), desc="writing tensors", unit="tensor", disable=None) as bar:
        files["text.parquet"] = write_parquet(
            out / "text.parquet", c.text, {"tower": "text", "family": c.family, "config": text_meta}, bar
        )
        files["vision.parquet"] = write_parquet(
            out / "vision.parquet",
            c.vision,
            {
                "tower": "vision",
                "family": c.family,
                "config": {"arch": "vit", "projection_dim": c.projection_dim, **c.vision_cfg},
            },
            bar,
        )
    tok_dir = out / "tokenizer"
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    tokenizer = c.write_tokenizer(tok_dir)
    for path in c.side_files:
        shutil.copy2(path, out / path.name)
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        if rel != "manifest.json" and not rel.endswith(".tmp") and rel not in files:
            files[rel] = sha256_file(path)
    manifest = {
        "format_version": FORMAT_VERSION,
        "family": c.family,
        "source": c.sources,
        "source_name": c.source_name,
        "model_id": compute_model_id(files),
        "projection_dim": c.projection_dim,
        "logit_scale": c.logit_scale,
        "logit_bias": c.logit_bias,
        "scoring": c.scoring,
        "text": {"arch": c.text_arch, "pooling": c.pooling, "config": c.text_cfg},
        "vision": {"arch": "vit", "config": c.vision_cfg},
        "tokenizer": tokenizer,
        "image": c.image,
        "files": files,
        "warnings": c.warnings,
    }
    write_manifest(out, manifest)
    log.info(
        "wrote %s: family %s, model_id %s, %d text + %d vision tensors",
        out,
        c.family,
        manifest["model_id"],
        len(c.text),
        len(c.vision),
    )
    return manifest


LAYOUTS = (
    "transformers CLIPModel / ChineseCLIPModel / SiglipModel (config.json), a BERT with --vision-checkpoint, "
    "open_clip hub folders (open_clip_config.json) and open_clip training checkpoints (epoch_N.pt with "
    "--model-config)"
)


def convert(
    checkpoint: str,
    out: str | Path,
    vision_checkpoint: str | None = None,
    projections: str | None = None,
    allow_pickle: bool = False,
    seed: int = 0,
    model_config: str | None = None,
    tokenizer: str | None = None,
) -> dict[str, Any]:
    """Convert a checkpoint (layout detected from its files) into WEIGHTS_DIR `out`; return the manifest written."""
    from . import families

    if (vision_checkpoint or projections) and not _is_bert(checkpoint):
        raise ConvertError("--vision-checkpoint/--projections apply only to a BERT --checkpoint (the bert_vit family)")
    if model_config or families.is_training_checkpoint(checkpoint):
        converted = families.open_clip_training(checkpoint, model_config, allow_pickle, tokenizer)
    else:
        src = resolve_checkpoint(checkpoint, allow_pickle)
        if (src / families.OPEN_CLIP_CONFIG).is_file() and not (src / "config.json").is_file():
            converted = families.open_clip_hub(checkpoint, src, allow_pickle, tokenizer)
        else:
            if not (src / "config.json").is_file():
                raise ConvertError(
                    f"{checkpoint}: no config.json and no {families.OPEN_CLIP_CONFIG}: not a layout "
                    f"convert knows ({LAYOUTS})"
                )
            raw = read_config(src)
            model_type = raw.get("model_type")
            if model_type in ("siglip", "siglip2"):
                converted = families.siglip(checkpoint, src, raw, allow_pickle)
            elif model_type in ("clip", "chinese_clip", "bert"):
                converted = _hf_clip(checkpoint, src, raw, vision_checkpoint, projections, allow_pickle, seed)
            else:
                raise ConvertError(
                    f"{checkpoint}: unsupported model_type {model_type!r} (clip, chinese_clip, bert, "
                    "siglip); convert reads " + LAYOUTS
                )
    return write_weights_dir(out, converted)


def _is_bert(checkpoint: str) -> bool:
    """Whether `checkpoint` is a local folder whose config.json says model_type bert (hub ids: checked later)."""
    path = Path(checkpoint).expanduser() / "config.json"
    if not path.is_file():
        return not Path(checkpoint).expanduser().exists()
    model_type = json.loads(path.read_text(encoding="utf-8")).get("model_type")
    return model_type in ("bert", "clip", "chinese_clip")  # clip: _hf_clip names the misuse itself


# ---------------------------------------------------------------------------------------------------- CLI
COMMAND_HELP = {"convert": "convert a CLIP / SigLIP / open_clip checkpoint into Parquet weights"}


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Arguments of `clip-triton convert`."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="SRC",
        help="folder or hub id: transformers CLIP / Chinese-CLIP / SigLIP / BERT (with "
        "--vision-checkpoint), an open_clip hub folder, or an open_clip epoch_N.pt "
        "(with --model-config)",
    )
    parser.add_argument("--out", required=True, metavar="WEIGHTS_DIR", help="output folder")
    parser.add_argument("--vision-checkpoint", metavar="SRC", help="CLIP checkpoint whose ViT tower pairs with a BERT")
    parser.add_argument(
        "--projections",
        metavar="FILE.safetensors",
        help="text projection for bert_vit (key text_projection.weight, shape [projection_dim, hidden])",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pytorch_model.bin / .pt checkpoints (pickle: only from sources you trust)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of a freshly initialised bert_vit text projection")
    parser.add_argument(
        "--model-config",
        metavar="NAME|FILE.json",
        help="open_clip training checkpoints (epoch_N.pt): the model config they were trained with, "
        "an open_clip model name (e.g. ViT-B-32) or a JSON file with embed_dim/vision_cfg/text_cfg",
    )
    parser.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="folder with the tokenizer an open_clip config names in hf_tokenizer_name (default: the "
        "checkpoint folder, else the hub)",
    )


def run(args: argparse.Namespace, command: str) -> int:
    """Entry point of `clip-triton convert`."""
    try:
        manifest = convert(
            args.checkpoint,
            args.out,
            args.vision_checkpoint,
            args.projections,
            args.allow_pickle,
            args.seed,
            model_config=args.model_config,
            tokenizer=args.tokenizer,
        )
    except WeightsError as e:
        log.error("%s", e)
        return 2
    log.info("model_id %s -> %s", manifest["model_id"], args.out)
    return 0
