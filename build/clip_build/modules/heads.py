"""Serving wrappers: a tower + its projection; fp32 in, fp32 out whatever the weights' dtype."""

from __future__ import annotations

from torch import Tensor, nn

from .layers import ragged_rows


class TextEncoder(nn.Module):
    """A ragged batch of token rows (layers.ragged_rows) -> unnormalised text embeddings float32 (B, D).

    input_ids: the rows' ids back to back (any shape: an (N, L) padded batch, or the 1-D ragged batch Triton makes);
    lengths, widths: int64 (B,) or (B, 1), tokens per row and each row's width in input_ids. The batch is padded to
    its longest row: masked positions change neither CLIP's EOT pooling nor BERT's masked pooling.
    """

    def __init__(
        self, text: nn.Module, hidden: int, projection_dim: int, dtype_name: str = "fp32", proj_bias: bool = False
    ):
        super().__init__()
        self.text = text
        self.text_projection = nn.Linear(hidden, projection_dim, bias=proj_bias)
        self.embed_dim = projection_dim
        self.dtype_name = dtype_name
        self.max_positions: int = text.max_positions

    def forward(self, input_ids: Tensor, lengths: Tensor, widths: Tensor) -> Tensor:
        ids, mask = ragged_rows(input_ids, lengths, widths, self.max_positions)  # (B, T) each
        pooled = self.text(ids, mask)  # (B, H)
        return self.text_projection(pooled).float()  # (B, D)


class ImageEncoder(nn.Module):
    """pixel_values float32 (B, 3, S, S) -> unnormalised image embeddings float32 (B, D)."""

    def __init__(
        self, vision: nn.Module, hidden: int, projection_dim: int, dtype_name: str = "fp32", proj_bias: bool = False
    ):
        super().__init__()
        self.vision = vision
        self.visual_projection = nn.Linear(hidden, projection_dim, bias=proj_bias)
        self.embed_dim = projection_dim
        self.dtype_name = dtype_name

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = pixel_values.to(self.visual_projection.weight.dtype)  # (B, 3, S, S) in the weights' dtype
        pooled = self.vision(x)  # (B, H)
        return self.visual_projection(pooled).float()  # (B, D)
