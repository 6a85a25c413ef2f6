"""CLIP-style text transformer: token + position embeddings, pre-LN blocks (causal or not), final LN, pooling.

Pooling: "argmax" (the highest id: OpenAI's EOT), "eos" (first eos_token_id), "last" (last position: SigLIP, whose
rows are padded to the context length) or "first". HF CLIP configs pool as transformers does (eos_token_id 2: argmax).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .config import TextTowerConfig
from .layers import PreLNBlock, additive_mask, clean_tokens

POOLS = ("argmax", "eos", "last", "first")


class ClipTextTransformer(nn.Module):
    """Returns the pooled (B, C) hidden state (CLIP: at the EOT token, as HF CLIPTextTransformer's pooler_output)."""

    def __init__(
        self,
        vocab: int,
        max_positions: int,
        hidden: int,
        layers: int,
        heads: int,
        intermediate: int,
        act: str,
        eps: float,
        eos_token_id: int,
        causal: bool = True,
        pool: str = "",
    ):
        super().__init__()
        pool = pool or ("argmax" if eos_token_id == 2 else "eos")
        if pool not in POOLS:
            raise ValueError(f"unsupported text pooling {pool!r}; supported: {POOLS}")
        self.causal = causal
        self.pool = pool
        self.token_embedding = nn.Embedding(vocab, hidden)
        self.position_embedding = nn.Embedding(max_positions, hidden)
        self.layers = nn.ModuleList([PreLNBlock(hidden, heads, intermediate, act, eps) for _ in range(layers)])
        self.final_ln = nn.LayerNorm(hidden, eps=eps)
        self.eos_token_id = eos_token_id
        self.vocab = vocab
        self.max_positions = max_positions

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | TextTowerConfig) -> ClipTextTransformer:
        """Build from a manifest text config (HF CLIPTextConfig keys + TextTowerConfig's)."""
        c = cfg if isinstance(cfg, TextTowerConfig) else TextTowerConfig.from_dict(cfg)
        return cls(
            c.vocab_size,
            c.max_position_embeddings,
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.intermediate_size,
            c.hidden_act,
            c.layer_norm_eps,
            int(c.eos_token_id),
            bool(c.causal),
            c.pool,
        )

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        input_ids, attention_mask = clean_tokens(input_ids, attention_mask, self.vocab, self.max_positions)
        B, T = input_ids.shape
        pos = torch.arange(T, device=input_ids.device)  # (T,)
        x = self.token_embedding(input_ids) + self.position_embedding(pos)  # (B, T, C)
        causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device)  # (T, T)
        if self.causal:
            causal = causal.tril()
        keep = causal.view(1, 1, T, T) & (attention_mask != 0).view(B, 1, 1, T)  # (B, 1, T, T)
        mask = additive_mask(keep, x.dtype)  # (B, 1, T, T)
        items = torch.arange(B, device=x.device)  # (B,)
        if self.pool == "last":  # the row's last position (rows padded to the context length: SigLIP)
            row = torch.full((B,), T - 1, dtype=torch.int64, device=x.device)
        elif self.pool == "first":
            row = torch.zeros(B, dtype=torch.int64, device=x.device)
        elif self.pool == "argmax":  # legacy configs / OpenAI BPE: the EOT token has the largest id
            row = input_ids.to(torch.int32).argmax(dim=-1).to(torch.int64)  # (B,)
        else:  # first occurrence of eos_token_id
            row = (input_ids == self.eos_token_id).to(torch.int32).argmax(dim=-1).to(torch.int64)  # (B,)
        n = len(self.layers)
        if n == 0:
            return self.final_ln(x[items, row])  # (B, C)
        for i, layer in enumerate(self.layers):
            if i < n - 1:
                x = layer(x, mask)  # (B, T, C)
            else:  # the last layer at the pooled position only: its other rows are never read
                x = layer.forward_row(x, mask[items, :, row].unsqueeze(2), row)  # (B, 1, C); mask (B, 1, 1, T)
        return self.final_ln(x[:, 0])  # (B, C)
