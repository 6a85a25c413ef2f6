"""BERT encoder (word + position + token-type embeddings, post-LN blocks) with CLS or masked-mean pooling."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .layers import PostLNBlock, additive_mask, clean_tokens

POOLINGS = ("cls", "mean")


class BertEncoder(nn.Module):
    """Returns the pooled (B, C) embedding: hidden state of [CLS] or the attention-mask-weighted mean."""

    def __init__(
        self,
        vocab: int,
        max_positions: int,
        type_vocab: int,
        hidden: int,
        layers: int,
        heads: int,
        intermediate: int,
        act: str,
        eps: float,
        pooling: str,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unsupported pooling {pooling!r}; supported: {POOLINGS}")
        self.word_embedding = nn.Embedding(vocab, hidden)
        self.position_embedding = nn.Embedding(max_positions, hidden)
        self.token_type_embedding = nn.Embedding(type_vocab, hidden)
        self.embed_ln = nn.LayerNorm(hidden, eps=eps)
        self.layers = nn.ModuleList([PostLNBlock(hidden, heads, intermediate, act, eps) for _ in range(layers)])
        self.pooling = pooling
        self.vocab = vocab
        self.max_positions = max_positions

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], pooling: str) -> BertEncoder:
        """Build from an HF BertConfig / ChineseCLIPTextConfig dict."""
        return cls(
            cfg["vocab_size"],
            cfg["max_position_embeddings"],
            cfg.get("type_vocab_size", 2),
            cfg["hidden_size"],
            cfg["num_hidden_layers"],
            cfg["num_attention_heads"],
            cfg["intermediate_size"],
            cfg.get("hidden_act", "gelu"),
            cfg.get("layer_norm_eps", 1e-12),
            pooling,
        )

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        input_ids, attention_mask = clean_tokens(input_ids, attention_mask, self.vocab, self.max_positions)
        B, T = input_ids.shape
        pos = torch.arange(T, device=input_ids.device)  # (T,)
        x = self.word_embedding(input_ids) + self.token_type_embedding.weight[0] + self.position_embedding(pos)
        x = self.embed_ln(x)  # (B, T, C)
        mask = additive_mask((attention_mask != 0).view(B, 1, 1, T), x.dtype)  # (B, 1, 1, T)
        if self.pooling == "cls" and len(self.layers) > 0:
            n = len(self.layers)
            first = torch.zeros(B, dtype=torch.int64, device=x.device)  # (B,) [CLS]
            for i, layer in enumerate(self.layers):
                if i < n - 1:
                    x = layer(x, mask)  # (B, T, C)
                else:  # the last layer at [CLS] only: its other rows are never read
                    x = layer.forward_row(x, mask, first)  # (B, 1, C)
            return x[:, 0]  # (B, C)
        for layer in self.layers:
            x = layer(x, mask)
        if self.pooling == "cls":
            return x[:, 0]  # (B, C)
        m = attention_mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
        return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)  # (B, C)
