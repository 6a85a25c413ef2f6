"""CLIP text transformer: token + position embeddings, causal pre-LN blocks, final LN, EOT pooling."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .layers import PreLNBlock, additive_mask, clean_tokens


class ClipTextTransformer(nn.Module):
    """Returns the pooled (B, C) hidden state at the EOT token, as HF CLIPTextTransformer's pooler_output."""

    def __init__(self, vocab: int, max_positions: int, hidden: int, layers: int, heads: int, intermediate: int,
                 act: str, eps: float, eos_token_id: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, hidden)
        self.position_embedding = nn.Embedding(max_positions, hidden)
        self.layers = nn.ModuleList([PreLNBlock(hidden, heads, intermediate, act, eps) for _ in range(layers)])
        self.final_ln = nn.LayerNorm(hidden, eps=eps)
        self.eos_token_id = eos_token_id
        self.vocab = vocab
        self.max_positions = max_positions

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ClipTextTransformer":
        """Build from an HF CLIPTextConfig dict."""
        return cls(cfg["vocab_size"], cfg["max_position_embeddings"], cfg["hidden_size"], cfg["num_hidden_layers"],
                   cfg["num_attention_heads"], cfg["intermediate_size"], cfg.get("hidden_act", "quick_gelu"),
                   cfg.get("layer_norm_eps", 1e-5), int(cfg.get("eos_token_id", 2)))

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        input_ids, attention_mask = clean_tokens(input_ids, attention_mask, self.vocab, self.max_positions)
        B, T = input_ids.shape
        pos = torch.arange(T, device=input_ids.device)  # (T,)
        x = self.token_embedding(input_ids) + self.position_embedding(pos)  # (B, T, C)
        causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()  # (T, T)
        keep = causal.view(1, 1, T, T) & (attention_mask != 0).view(B, 1, 1, T)  # (B, 1, T, T)
        mask = additive_mask(keep, x.dtype)  # (B, 1, T, T)
        for layer in self.layers:
            x = layer(x, mask)
        x = self.final_ln(x)  # (B, T, C)
        if self.eos_token_id == 2:  # legacy configs: the EOT token has the largest id
            eot = input_ids.to(torch.int32).argmax(dim=-1)  # (B,)
        else:  # first occurrence of eos_token_id
            eot = (input_ids == self.eos_token_id).to(torch.int32).argmax(dim=-1)  # (B,)
        return x[torch.arange(B, device=x.device), eot]  # (B, C)
