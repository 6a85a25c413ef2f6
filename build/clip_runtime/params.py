"""The one place that defines, documents and parses the `parameters {}` of our Python models' config.pbtxt.

config.pbtxt stores every parameter as a string (`string_value`); `encode` writes them and `read_parameters`
turns them back into typed values, falling back to the defaults below.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Param:
    """A config.pbtxt parameter: its type, default and meaning."""

    kind: str  # "int" | "float" | "bool" | "str" | "floats" | "strs"
    default: Any
    doc: str


# Defaults live here and nowhere else. Images and texts arrive from untrusted clients: the limits are hard caps.
PARAMETERS: dict[str, Param] = {
    # preprocess_text
    "tokenizer_file": Param("str", "tokenizer.json", "tokenizer.json, relative to the model version folder"),
    "max_length": Param("int", 77, "tokens per text after truncation (the text tower's context length)"),
    "pad_token_id": Param("int", 0, "id written into padded positions"),
    "tokenizer_kind": Param(
        "str",
        "tokenizers",
        "tokenizers (pad to the longest text) | tokenizers_fixed (pad to "
        "max_length, every position fed) | siglip_spm (SigLIP's SentencePiece, tokenizer_file = "
        "spiece.model)",
    ),
    "tokenizer_settings": Param("str", "", "JSON file beside tokenizer_file with siglip_spm's special tokens"),
    "max_text_bytes": Param("int", 16384, "largest accepted UTF-8 text, bytes"),
    # preprocess_image
    "image_size": Param("int", 224, "resize target: shortest edge (resize_mode=shortest_edge) or square side"),
    "resize_mode": Param(
        "str",
        "shortest_edge",
        "shortest_edge (keep aspect) | exact (height=width=image_size) | "
        "longest (long side = image_size, padded to the square)",
    ),
    "crop_size": Param("int", 224, "center crop side; the encoder input is [3, crop_size, crop_size]"),
    "do_center_crop": Param("bool", True, "center-crop after resizing"),
    "pad_fill": Param("int", 0, "resize_mode=longest: value of the padding around the resized image"),
    "crop_rounding": Param(
        "str", "floor", "center-crop offset: floor((d) / 2) as transformers | round as torchvision (open_clip)"
    ),
    "resample": Param("int", 3, "PIL resampling filter (3 = bicubic, as CLIPImageProcessor)"),
    "rescale_factor": Param("float", 1 / 255, "uint8 -> [0, 1] factor"),
    "image_mean": Param("floats", [0.48145466, 0.4578275, 0.40821073], "per-channel mean (OpenAI CLIP)"),
    "image_std": Param("floats", [0.26862954, 0.26130258, 0.27577711], "per-channel std (OpenAI CLIP)"),
    "max_image_bytes": Param("int", 20 * 1024 * 1024, "largest accepted encoded image, bytes"),
    "max_pixels": Param("int", 40_000_000, "largest accepted width*height, checked before decoding (bombs)"),
    "max_aspect_ratio": Param("int", 10_000, "largest accepted long side / short side, checked before decoding"),
    "allowed_formats": Param("strs", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"], "Pillow decoders allowed"),
    "jpeg_draft_gap": Param(
        "float",
        0.0,
        "0 = exact CLIPImageProcessor pixels; e.g. 4: JPEG DCT-downscale to >= 4x the "
        "target first (2x faster on 12 MP photos, pixels off by up to ~2/255)",
    ),
    "decode_threads": Param("int", 0, "threads decoding one batch's images (0 = min(4, cpu count))"),
    "image_decode": Param(
        "str",
        "cpu",
        "cpu: Pillow, CLIPImageProcessor-exact; gpu: nvJPEG + resize on the GPU "
        "(torch + torchvision with CUDA in the stub; KIND_GPU instances; pixels handed on on the GPU)",
    ),
    # preprocess_*, postprocess
    "max_items_per_request": Param(
        "int", 64, "texts or images in one request (postprocess: text and image embeddings each)"
    ),
    # postprocess
    "logit_scale": Param("float", 4.605170249938965, "raw learned logit scale; logits use exp(logit_scale)"),
    "logit_bias": Param("float", 0.0, "added to every logit (SigLIP's learned bias; 0 for CLIP)"),
    "scoring": Param("str", "softmax", "probs: softmax over the texts (CLIP) | sigmoid of each logit (SigLIP)"),
    "default_top_k": Param("int", 5, "top_k used when a request sends none"),
    "model_id": Param("str", "", "identity of the weights (manifest model_id); clients tag galleries with it"),
    # TorchScript encoders: the libtorch backend's own parameter names (our Python-based runner reads the same)
    "INFERENCE_MODE": Param("bool", True, "run forward() under torch.inference_mode"),
    "DISABLE_OPTIMIZED_EXECUTION": Param("bool", False, "turn TorchScript's profiling executor off"),
    "INTRA_OP_THREAD_COUNT": Param("int", 0, "torch intra-op threads per instance (0 = torch's default)"),
    "INTER_OP_THREAD_COUNT": Param("int", 0, "torch inter-op threads (process-global; 0 = torch's default)"),
    # Read by Triton's python backend itself (our runner is one): "no" lets GPU inputs reach execute() on the GPU
    "FORCE_CPU_ONLY_INPUT_TENSORS": Param(
        "str",
        "yes",
        "python backend: 'no' keeps inputs where the producer left "
        "them (set on image_encoder by --image-decode gpu; libtorch ignores it)",
    ),
}

# The parameters that bound what one request may carry (documented defaults table: README, "Security and limits").
LIMITS = (
    "max_items_per_request",
    "max_text_bytes",
    "max_image_bytes",
    "max_pixels",
    "max_aspect_ratio",
    "allowed_formats",
)

_PARSERS: dict[str, Callable[[str], Any]] = {
    "int": lambda s: int(s.strip()),
    "float": lambda s: float(s.strip()),
    "bool": lambda s: {
        "true": True,
        "1": True,
        "yes": True,
        "on": True,
        "false": False,
        "0": False,
        "no": False,
        "off": False,
    }[s.strip().lower()],
    "str": lambda s: s,
    "floats": lambda s: [float(v) for v in s.split(",") if v.strip()],
    "strs": lambda s: [v.strip() for v in s.split(",") if v.strip()],
}


class ParameterError(ValueError):
    """A parameter in config.pbtxt has the wrong type or is unknown."""


def encode(name: str, value: Any) -> str:
    """Value -> the string stored in config.pbtxt."""
    kind = PARAMETERS[name].kind
    if kind == "bool":
        return "true" if value else "false"
    if kind == "floats":
        return ",".join(repr(float(v)) for v in value)
    if kind == "strs":
        return ",".join(str(v) for v in value)
    if kind == "float":
        return repr(float(value))
    return str(value)


def read_parameters(model_config: dict | str, names: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Typed values for `names` from a model config (dict or the JSON string Triton passes to initialize)."""
    if isinstance(model_config, str):
        model_config = json.loads(model_config)
    raw = {
        k: (v.get("string_value") if isinstance(v, dict) else v)
        for k, v in (model_config.get("parameters") or {}).items()
    }
    out: dict[str, Any] = {}
    for name in names:
        spec = PARAMETERS[name]
        text = raw.get(name)
        if text is None or text == "":
            out[name] = spec.default
            continue
        try:
            out[name] = _PARSERS[spec.kind](str(text))
        except (ValueError, KeyError) as exc:
            raise ParameterError(f"parameter {name}={text!r} is not a valid {spec.kind}") from exc
    return out


# The parameters each Python model reads: the build writes exactly these into its config.pbtxt.
PREPROCESS_TEXT = (
    "tokenizer_file",
    "tokenizer_kind",
    "tokenizer_settings",
    "max_length",
    "pad_token_id",
    "max_text_bytes",
    "max_items_per_request",
    "model_id",
)
PREPROCESS_IMAGE = (
    "image_size",
    "resize_mode",
    "crop_size",
    "do_center_crop",
    "crop_rounding",
    "pad_fill",
    "resample",
    "rescale_factor",
    "image_mean",
    "image_std",
    "max_image_bytes",
    "max_pixels",
    "max_aspect_ratio",
    "allowed_formats",
    "jpeg_draft_gap",
    "decode_threads",
    "image_decode",
    "max_items_per_request",
    "model_id",
)
