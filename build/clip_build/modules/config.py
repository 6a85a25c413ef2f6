"""Typed tower configs: what our modules need from a WEIGHTS_DIR manifest's tower `config` (HF-style key names, plus
our keys for the families beyond CLIP), one field per knob with its meaning and default."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class TextTowerConfig:
    """A pre-LN text transformer (CLIP, SigLIP, open_clip)."""

    vocab_size: int
    max_position_embeddings: int  # context length
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "quick_gelu"  # modules.layers.ACTIVATIONS
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2  # "eos" pooling's token; 2 (legacy HF CLIP configs) means argmax pooling by default
    causal: bool = True  # False: bidirectional (SigLIP; rows are then padded to the context length)
    pool: str = ""  # argmax | eos | last | first; "" = transformers' CLIP rule from eos_token_id
    proj_bias: bool = False  # the text projection has a bias (SigLIP's head, open_clip proj_bias)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> TextTowerConfig:
        """The fields of `cfg` this config knows (others, e.g. HF bookkeeping, are ignored)."""
        return cls(**_known(cls, cfg))


@dataclass(frozen=True)
class VisionTowerConfig:
    """A ViT (CLIP, SigLIP, open_clip)."""

    image_size: int
    patch_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    class_token: bool = True  # False: SigLIP (no class embedding; positions = patches)
    patch_bias: bool = False  # the patch convolution has a bias (SigLIP)
    pre_norm: bool = True  # LayerNorm before the blocks (CLIP's pre_layrnorm, open_clip's ln_pre)
    pool: str = "cls"  # cls | avg | map (SigLIP's attention-pool head)
    final_ln_after_pool: bool = False  # avg pooling: LayerNorm after the mean instead of before (open_clip)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> VisionTowerConfig:
        """The fields of `cfg` this config knows."""
        return cls(**_known(cls, cfg))


def _known(cls: type, cfg: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in cfg.items() if k in names and v is not None}
