"""Transformer building blocks shared by the text and vision towers (TorchScript-able)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu")
QUICK_GELU_ALPHA = 1.702  # quick_gelu(x) = x * sigmoid(1.702 x)


def check_activation(name: str) -> str:
    """Return `name` if supported, else raise ValueError."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {name!r}; supported: {ACTIVATIONS}")
    return name


def additive_mask(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool keep-mask (True = attend) -> additive float mask: 0 where kept, dtype's lowest value elsewhere."""
    lowest = -3.4028234663852886e38  # torch.finfo(dtype).min, spelled out (torch.finfo is not scriptable)
    if dtype == torch.float16:
        lowest = -65504.0
    elif dtype == torch.bfloat16:
        lowest = -3.3895313892515355e38
    zero = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    return zero.masked_fill(~keep, lowest)


def clean_tokens(input_ids: Tensor, attention_mask: Tensor, vocab: int, max_positions: int) -> tuple[Tensor, Tensor]:
    """Whatever int64 (B, L) pair a caller sends -> ids in [0, vocab) and a 0/1 mask, both (B, T), T = L capped to
    1..max_positions; the mask is cut or zero-padded to T. Valid input passes unchanged.

    The encoders are served to anyone who calls the inference API, and one failing forward fails its whole dynamic
    batch (libtorch backend included): out-of-vocabulary or negative ids, too long, empty or mismatched sequences
    must not raise here.
    """
    B = input_ids.shape[0]
    T = max(1, min(input_ids.shape[1], max_positions))
    n = min(T, input_ids.shape[1])
    ids = torch.zeros((B, T), dtype=torch.int64, device=input_ids.device)  # (B, T)
    ids[:, :n] = input_ids[:, :n].to(torch.int64).clamp(0, vocab - 1)
    rows, cols = min(B, attention_mask.shape[0]), min(T, attention_mask.shape[1])
    mask = torch.zeros((B, T), dtype=torch.int64, device=input_ids.device)  # (B, T)
    mask[:rows, :cols] = (attention_mask[:rows, :cols] != 0).to(torch.int64)
    return ids, mask


def _per_row(values: Tensor, rows: int, high: int) -> Tensor:
    """The first `rows` values of any-shaped int tensor, clamped to [0, high]; missing ones are 0. (rows,) int64."""
    flat = values.reshape(-1)[:rows].to(torch.int64).clamp(0, high)
    out = torch.zeros(rows, dtype=torch.int64, device=values.device)  # (rows,)
    out[: flat.shape[0]] = flat
    return out


def ragged_rows(input_ids: Tensor, lengths: Tensor, widths: Tensor, max_positions: int) -> tuple[Tensor, Tensor]:
    """A ragged batch of token rows -> ids and a 0/1 mask, both int64 (B, T), T = the longest row, 1..max_positions.

    input_ids holds the rows back to back in any shape (the libtorch backend hands a ragged input over as ONE 1-D
    tensor: every request's [n, L] buffer flattened, in request order); row r takes widths[r] entries, of which the
    first lengths[r] are tokens. B = rows of `lengths` (B or B x 1). Positions past a row's length are 0 with mask 0.

    Whatever a caller sends (negative or huge counts, lengths over widths, widths whose sum is not input_ids' size,
    fewer widths than lengths, no rows): nothing is read out of range and nothing raises.
    """
    flat = input_ids.reshape(-1)
    total = flat.shape[0]
    B = lengths.shape[0]
    width = _per_row(widths, B, total)  # (B,)
    length = torch.minimum(_per_row(lengths, B, max_positions), width)  # (B,)
    T = 1
    if B > 0:
        T = max(1, int(length.max()))
    start = torch.cumsum(width, 0) - width  # (B,) where each row begins in flat
    pos = torch.arange(T, device=flat.device)  # (T,)
    index = start.view(B, 1) + pos.view(1, T)  # (B, T)
    keep = (pos.view(1, T) < length.view(B, 1)) & (index < total)  # (B, T)
    ids = torch.zeros((B, T), dtype=torch.int64, device=flat.device)  # (B, T)
    if total > 0:
        ids = torch.where(keep, flat.to(torch.int64)[index.clamp(0, total - 1)], ids)
    return ids, keep.to(torch.int64)


class MLP(nn.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)
        self.act = check_activation(act)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)  # (B, T, I)
        if self.act == "silu":
            x = F.silu(x)
        elif self.act == "quick_gelu":
            x = x * torch.sigmoid(1.702 * x)  # QUICK_GELU_ALPHA (a literal: TorchScript takes no globals)
        elif self.act == "gelu":
            x = F.gelu(x)
        elif self.act == "relu":
            x = F.relu(x)
        else:  # gelu_new / gelu_pytorch_tanh
            x = F.gelu(x, approximate="tanh")
        return self.fc2(x)  # (B, T, C)

    def fold_quick_gelu(self) -> None:
        """quick_gelu(h) = silu(a h) / a (a = 1.702): fold a into fc1 and 1/a into fc2, so the activation is one silu
        kernel instead of three elementwise passes (measured ~3x faster on CPU, fp32 and bf16). Call in fp32."""
        if self.act != "quick_gelu":
            return
        with torch.no_grad():
            self.fc1.weight.mul_(QUICK_GELU_ALPHA)
            self.fc1.bias.mul_(QUICK_GELU_ALPHA)
            self.fc2.weight.div_(QUICK_GELU_ALPHA)
        self.act = "silu"


def fold_activations(module: nn.Module) -> nn.Module:
    """fold_quick_gelu on every MLP of `module` (exported models only; the Parquet weights stay as converted)."""
    for m in module.modules():
        if isinstance(m, MLP):
            m.fold_quick_gelu()
    return module


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        if hidden % heads != 0:
            raise ValueError(f"hidden size {hidden} is not a multiple of {heads} heads")
        self.heads = heads
        self.head_dim = hidden // heads
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        v = self.v(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hd); mask additive (B, 1, T|1, T)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.out(y)

    def forward_query(self, xq: Tensor, x: Tensor, mask: Tensor | None) -> Tensor:
        """Attention output for the query rows xq (B, Q, C) over all of x (B, T, C); mask additive (B, 1, Q|1, T)."""
        B, T, C = x.shape
        Q = xq.shape[1]
        q = self.q(xq).view(B, Q, self.heads, self.head_dim).transpose(1, 2)  # (B, nh, Q, hd)
        k = self.k(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        v = self.v(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, Q, hd)
        return self.out(y.transpose(1, 2).reshape(B, Q, C))  # (B, Q, C)


class PreLNBlock(nn.Module):
    """CLIP encoder layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, hidden: int, heads: int, intermediate: int, act: str, eps: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden, eps=eps)
        self.attn = SelfAttention(hidden, heads)
        self.ln2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = MLP(hidden, intermediate, act)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.attn(self.ln1(x), mask)  # (B, T, C)
        return x + self.mlp(self.ln2(x))  # (B, T, C)

    def forward_row(self, x: Tensor, mask: Tensor | None, row: Tensor) -> Tensor:
        """The block's output at one position per item, row (B,) int64: (B, 1, C). The last layer of a tower that
        pools one token needs nothing else (keys and values still come from every position)."""
        h = self.ln1(x)  # (B, T, C)
        items = torch.arange(x.shape[0], device=x.device)  # (B,)
        xr = x[items, row].unsqueeze(1) + self.attn.forward_query(h[items, row].unsqueeze(1), h, mask)  # (B, 1, C)
        return xr + self.mlp(self.ln2(xr))  # (B, 1, C)


class PostLNBlock(nn.Module):
    """BERT encoder layer: ln1(x + attn(x)), then ln2(x + mlp(x))."""

    def __init__(self, hidden: int, heads: int, intermediate: int, act: str, eps: float):
        super().__init__()
        self.attn = SelfAttention(hidden, heads)
        self.ln1 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = MLP(hidden, intermediate, act)
        self.ln2 = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = self.ln1(x + self.attn(x, mask))  # (B, T, C)
        return self.ln2(x + self.mlp(x))  # (B, T, C)

    def forward_row(self, x: Tensor, mask: Tensor | None, row: Tensor) -> Tensor:
        """As PreLNBlock.forward_row: the output at position row[b] of each item b, (B, 1, C)."""
        items = torch.arange(x.shape[0], device=x.device)  # (B,)
        xr = x[items, row].unsqueeze(1)  # (B, 1, C)
        xr = self.ln1(xr + self.attn.forward_query(xr, x, mask))  # (B, 1, C)
        return self.ln2(xr + self.mlp(xr))  # (B, 1, C)
