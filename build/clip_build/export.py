"""Build our encoders from a WEIGHTS_DIR (each reading only its own Parquet file) and export them as TorchScript."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .modules import BertEncoder, ClipTextTransformer, ImageEncoder, TextEncoder, VisionTransformer
from .modules.layers import fold_activations
from .weights import WeightsFormatError, load_manifest, open_tower, sha256_file

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {tuple(DTYPES)}")
    return DTYPES[dtype]


def _load(module: nn.Module, weights_dir: str | os.PathLike, tower: str, dtype: str) -> nn.Module:
    """Fill a meta-device module from <tower>.parquet (strict), cast to dtype, eval mode."""
    state = open_tower(weights_dir, tower).read_torch()
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise WeightsFormatError(f"{weights_dir}/{tower}.parquet does not match its config: {e}") from e
    fold_activations(module.float())  # in fp32, before the cast: no extra rounding in low precision
    return module.to(_torch_dtype(dtype)).eval().requires_grad_(False)


def build_text_encoder(weights_dir: str | os.PathLike, dtype: str = "fp32") -> nn.Module:
    """TextEncoder: forward(input_ids int64 rows back to back, lengths (B, 1), widths (B, 1)) -> (B, D) float32."""
    _torch_dtype(dtype)
    manifest = load_manifest(weights_dir, verify=True, files=["text.parquet"])
    text, cfg = manifest["text"], manifest["text"]["config"]
    with torch.device("meta"):
        if text["arch"] == "clip_text":
            tower: nn.Module = ClipTextTransformer.from_config(cfg)
        elif text["arch"] == "bert":
            tower = BertEncoder.from_config(cfg, text["pooling"])
        else:
            raise WeightsFormatError(f"{weights_dir}: unknown text arch {text['arch']!r}")
        module = TextEncoder(
            tower, cfg["hidden_size"], manifest["projection_dim"], dtype, bool(cfg.get("proj_bias", False))
        )
    return _load(module, weights_dir, "text", dtype)


def build_image_encoder(weights_dir: str | os.PathLike, dtype: str = "fp32") -> nn.Module:
    """ImageEncoder: forward(pixel_values (B, 3, S, S) float32) -> (B, D) float32, unnormalised."""
    _torch_dtype(dtype)
    manifest = load_manifest(weights_dir, verify=True, files=["vision.parquet"])
    vision, cfg = manifest["vision"], manifest["vision"]["config"]
    if vision["arch"] != "vit":
        raise WeightsFormatError(f"{weights_dir}: unknown vision arch {vision['arch']!r}")
    with torch.device("meta"):
        module = ImageEncoder(
            VisionTransformer.from_config(cfg),
            cfg["hidden_size"],
            manifest["projection_dim"],
            dtype,
            bool(cfg.get("proj_bias", False)),
        )
    return _load(module, weights_dir, "vision", dtype)


def export_torchscript(module: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """torch.jit.script the encoder, save it to path (loadable by torch.jit.load alone) and describe it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    scripted = torch.jit.script(module)
    torch.jit.save(scripted, str(path))
    if isinstance(module, TextEncoder):
        kind = "text"
        inputs = [
            {"name": "input_ids", "dtype": "int64", "shape": [-1]},  # ragged: every row back to back
            {"name": "lengths", "dtype": "int64", "shape": [-1, 1]},
            {"name": "widths", "dtype": "int64", "shape": [-1, 1]},
        ]
    elif isinstance(module, ImageEncoder):
        kind = "image"
        s = int(module.vision.image_size)
        inputs = [{"name": "pixel_values", "dtype": "float32", "shape": [-1, 3, s, s]}]
    else:
        raise TypeError(f"expected a TextEncoder or ImageEncoder, got {type(module).__name__}")
    return {
        "kind": kind,
        "file": path.name,
        "sha256": sha256_file(path),
        "method": "torch.jit.script",
        "torch_version": torch.__version__,
        "dtype": module.dtype_name,
        "inputs": inputs,
        "output": {"dtype": "float32", "shape": [-1, int(module.embed_dim)]},
        "embed_dim": int(module.embed_dim),
    }
