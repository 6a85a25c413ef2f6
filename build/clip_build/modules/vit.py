"""Vision transformer: patch conv, optional class token, optional pre-LN, pre-LN blocks, post-LN, pooling.

Pooling: "cls" (HF CLIP, open_clip `tok`: the class token), "avg" (open_clip `avg`: mean of the patch tokens) or
"map" (SigLIP: a multi-head attention pooling head over every token).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import VisionTowerConfig
from .layers import MLP, PreLNBlock

POOLS = ("cls", "avg", "map")


class MapHead(nn.Module):
    """SigLIP's attention pooling head: a learned probe attends over the tokens, then LN + MLP with a residual."""

    def __init__(self, hidden: int, heads: int, intermediate: int, act: str, eps: float):
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(torch.zeros(1, 1, hidden))
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.ln = nn.LayerNorm(hidden, eps=eps)
        self.mlp = MLP(hidden, intermediate, act)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        hd = C // self.heads
        q = self.q(self.probe.to(x.dtype)).expand(B, 1, C)  # (B, 1, C)
        q = q.reshape(B, 1, self.heads, hd).transpose(1, 2)  # (B, nh, 1, hd)
        k = self.k(x).view(B, N, self.heads, hd).transpose(1, 2)  # (B, nh, N, hd)
        v = self.v(x).view(B, N, self.heads, hd).transpose(1, 2)  # (B, nh, N, hd)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, 1, C)  # (B, 1, C)
        y = self.out(y)
        y = y + self.mlp(self.ln(y))  # (B, 1, C)
        return y[:, 0]  # (B, C)


class VisionTransformer(nn.Module):
    """Returns the pooled (B, C) features (HF CLIP: post_layernorm(CLS), as CLIPVisionTransformer's pooler_output)."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        channels: int,
        hidden: int,
        layers: int,
        heads: int,
        intermediate: int,
        act: str,
        eps: float,
        class_token: bool = True,
        patch_bias: bool = False,
        pre_norm: bool = True,
        pool: str = "cls",
        final_ln_after_pool: bool = False,
    ):
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"image size {image_size} is not a multiple of patch size {patch_size}")
        if pool not in POOLS or (pool == "cls" and not class_token):
            raise ValueError(f"unsupported vision pooling {pool!r} (class token: {class_token}); supported: {POOLS}")
        self.image_size = image_size
        self.num_prefix = 1 if class_token else 0
        self.pool = pool
        self.final_ln_after_pool = final_ln_after_pool
        self.patch_embedding = nn.Conv2d(channels, hidden, kernel_size=patch_size, stride=patch_size, bias=patch_bias)
        self.class_embedding = nn.Parameter(torch.zeros(hidden if class_token else 0))  # (C,) or (0,): none
        self.position_embedding = nn.Embedding((image_size // patch_size) ** 2 + self.num_prefix, hidden)
        self.pre_ln = nn.LayerNorm(hidden, eps=eps) if pre_norm else nn.Identity()
        self.layers = nn.ModuleList([PreLNBlock(hidden, heads, intermediate, act, eps) for _ in range(layers)])
        self.post_ln = nn.LayerNorm(hidden, eps=eps)
        self.head = MapHead(hidden, heads, intermediate, act, eps) if pool == "map" else nn.Identity()

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | VisionTowerConfig) -> VisionTransformer:
        """Build from a manifest vision config (HF CLIPVisionConfig keys + VisionTowerConfig's)."""
        c = cfg if isinstance(cfg, VisionTowerConfig) else VisionTowerConfig.from_dict(cfg)
        return cls(
            c.image_size,
            c.patch_size,
            c.num_channels,
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.intermediate_size,
            c.hidden_act,
            c.layer_norm_eps,
            c.class_token,
            c.patch_bias,
            c.pre_norm,
            c.pool,
            c.final_ln_after_pool,
        )

    def forward(self, pixel_values: Tensor) -> Tensor:
        B = pixel_values.shape[0]
        x = self.patch_embedding(pixel_values)  # (B, C, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        if self.num_prefix > 0:
            cls = self.class_embedding.to(x.dtype).expand(B, 1, -1)  # (B, 1, C)
            x = torch.cat([cls, x], dim=1)  # (B, N+1, C)
        x = x + self.position_embedding.weight.to(x.dtype)  # (B, P, C)
        x = self.pre_ln(x)
        no_mask: Tensor | None = None
        if self.pool == "cls" and len(self.layers) > 0:
            n = len(self.layers)
            first = torch.zeros(B, dtype=torch.int64, device=x.device)  # (B,) the class token
            for i, layer in enumerate(self.layers):
                if i < n - 1:
                    x = layer(x, no_mask)  # (B, P, C)
                else:  # the last layer at the class token only: its other rows are never read
                    x = layer.forward_row(x, no_mask, first)  # (B, 1, C)
            return self.post_ln(x[:, 0])  # (B, C)
        for layer in self.layers:
            x = layer(x, no_mask)
        if self.pool == "cls":
            return self.post_ln(x[:, 0])  # (B, C)
        if self.pool == "avg":
            tokens = x[:, self.num_prefix :]  # (B, N, C)
            if self.final_ln_after_pool:
                return self.post_ln(tokens.mean(dim=1))
            return self.post_ln(tokens).mean(dim=1)  # (B, C)
        return self.head(self.post_ln(x))  # (B, C)
