"""CLIP vision transformer: patch conv (no bias), class token, pre-LN, pre-LN blocks, post-LN on the class token."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from .layers import PreLNBlock


class VisionTransformer(nn.Module):
    """Returns post_layernorm(CLS) (B, C), as HF CLIPVisionTransformer's pooler_output."""

    def __init__(self, image_size: int, patch_size: int, channels: int, hidden: int, layers: int, heads: int,
                 intermediate: int, act: str, eps: float):
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"image size {image_size} is not a multiple of patch size {patch_size}")
        self.image_size = image_size
        self.patch_embedding = nn.Conv2d(channels, hidden, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(hidden))
        self.position_embedding = nn.Embedding((image_size // patch_size) ** 2 + 1, hidden)
        self.pre_ln = nn.LayerNorm(hidden, eps=eps)
        self.layers = nn.ModuleList([PreLNBlock(hidden, heads, intermediate, act, eps) for _ in range(layers)])
        self.post_ln = nn.LayerNorm(hidden, eps=eps)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "VisionTransformer":
        """Build from an HF CLIPVisionConfig dict."""
        return cls(cfg["image_size"], cfg["patch_size"], cfg.get("num_channels", 3), cfg["hidden_size"],
                   cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["intermediate_size"],
                   cfg.get("hidden_act", "quick_gelu"), cfg.get("layer_norm_eps", 1e-5))

    def forward(self, pixel_values: Tensor) -> Tensor:
        B = pixel_values.shape[0]
        x = self.patch_embedding(pixel_values)  # (B, C, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        cls = self.class_embedding.to(x.dtype).expand(B, 1, -1)  # (B, 1, C)
        x = torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (B, N+1, C)
        x = self.pre_ln(x)
        no_mask: Optional[Tensor] = None
        for layer in self.layers:
            x = layer(x, no_mask)
        return self.post_ln(x[:, 0])  # (B, C)
