"""Serving wrappers: a tower + its projection; fp32 in, fp32 out whatever the weights' dtype."""

from __future__ import annotations

from torch import Tensor, nn


class TextEncoder(nn.Module):
    """(input_ids, attention_mask) int64 (B, L) -> unnormalised text embeddings float32 (B, D)."""

    def __init__(self, text: nn.Module, hidden: int, projection_dim: int, dtype_name: str = "fp32"):
        super().__init__()
        self.text = text
        self.text_projection = nn.Linear(hidden, projection_dim, bias=False)
        self.embed_dim = projection_dim
        self.dtype_name = dtype_name

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        pooled = self.text(input_ids, attention_mask)  # (B, H)
        return self.text_projection(pooled).float()  # (B, D)


class ImageEncoder(nn.Module):
    """pixel_values float32 (B, 3, S, S) -> unnormalised image embeddings float32 (B, D)."""

    def __init__(self, vision: nn.Module, hidden: int, projection_dim: int, dtype_name: str = "fp32"):
        super().__init__()
        self.vision = vision
        self.visual_projection = nn.Linear(hidden, projection_dim, bias=False)
        self.embed_dim = projection_dim
        self.dtype_name = dtype_name

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = pixel_values.to(self.visual_projection.weight.dtype)  # (B, 3, S, S) in the weights' dtype
        pooled = self.vision(x)  # (B, H)
        return self.visual_projection(pooled).float()  # (B, D)
