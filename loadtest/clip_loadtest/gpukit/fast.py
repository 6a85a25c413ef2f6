"""The GPU kit's faster towers: CUDA graphs for fixed batch buckets and an optional FP8 path for the linear layers,
each behind a parity gate against the plain tower.

- GraphedTower: a batch of n rows runs as the smallest bucket >= n (rows zero-padded, outputs cut back to n). On CUDA
  each bucket is captured once as a CUDA graph and replayed (no per-kernel launch cost: what a ViT-B/32 tower at
  small batches is bound by); elsewhere the padded batch runs eagerly, so CPU/CI runs the bucketing itself.
- to_fp8: every nn.Linear of the tower's transformer layers -> Fp8Linear (float8_e4m3fn weights with a per-tensor
  scale, activations scaled per call); on CUDA (Hopper: sm_90) torch._scaled_mm runs the FP8 matmul; elsewhere the same
  quantised operands are multiplied in fp32 (emulated: the numerics the parity gate judges, not the speed).
- fp8_parity: min cosine against the reference embeddings and zero-shot top-1 agreement on a fixed label set
  (gate: cosine >= FP8_MIN_COSINE and agreement >= FP8_MIN_AGREEMENT).

Neither is served through Triton this round: the towers are timed alone. TorchScript, and so the NGC 24.10 libtorch
backend (torch 2.5), can script Fp8Linear only with torch._scaled_mm's 2.5 signature; CUDA graphs are not a libtorch
backend option at all (serving them needs a Python-based runner with graphs, see docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_MIN_COSINE = 0.999
FP8_MIN_AGREEMENT = 0.99
DEFAULT_BUCKETS = (1, 8, 16, 32, 64, 128, 256)


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= rows (ValueError past the largest: split the batch first)."""
    for b in sorted(buckets):
        if b >= rows:
            return b
    raise ValueError(f"batch of {rows} rows is larger than the largest bucket {max(buckets)}")


class GraphedTower:
    """`model` run at fixed batch buckets: CUDA graphs replayed on CUDA, padded eager calls elsewhere."""

    def __init__(self, model: nn.Module, buckets: Sequence[int] = DEFAULT_BUCKETS):
        if not buckets or min(buckets) < 1:
            raise ValueError(f"buckets must be positive batch sizes, got {list(buckets)}")
        self.model = model
        self.buckets = tuple(sorted(set(buckets)))
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}

    def _capture(self, like: Tensor, bucket: int) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor]:
        static_in = torch.zeros((bucket, *like.shape[1:]), dtype=like.dtype, device=like.device)  # (bucket, ...)
        side = torch.cuda.Stream(like.device)
        side.wait_stream(torch.cuda.current_stream(like.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up on a side stream, as torch.cuda.graphs asks before capture
                self.model(static_in)
        torch.cuda.current_stream(like.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.model(static_in)
        return graph, static_in, static_out

    def __call__(self, x: Tensor) -> Tensor:
        rows = x.shape[0]
        bucket = bucket_for(rows, self.buckets)
        if x.is_cuda:
            if bucket not in self.graphs:
                self.graphs[bucket] = self._capture(x, bucket)
            graph, static_in, static_out = self.graphs[bucket]
            static_in[:rows].copy_(x)
            static_in[rows:].zero_()
            graph.replay()
            return static_out[:rows].clone()
        padded = torch.cat([x, x.new_zeros((bucket - rows, *x.shape[1:]))]) if bucket > rows else x
        return self.model(padded)[:rows]


class Fp8Linear(nn.Module):
    """nn.Linear with float8_e4m3fn weights (per-tensor scale) and activations quantised per call."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()  # (out, in)
        scale = w.abs().max().clamp(min=1e-12) / FP8_MAX
        self.register_buffer("weight", (w / scale).to(torch.float8_e4m3fn))  # (out, in)
        self.register_buffer("w_scale", scale.reshape(()))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)  # (M, K)
        x_scale = (x2.abs().max().float().clamp(min=1e-12) / FP8_MAX).reshape(())
        xq = (x2.float() / x_scale).to(torch.float8_e4m3fn)  # (M, K)
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        if x.is_cuda:  # weight.t(): the column-major (K, N) operand _scaled_mm wants
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale, scale_b=self.w_scale, out_dtype=out_dtype)
        else:  # emulated: the same quantised operands, multiplied exactly
            y = (xq.float() @ self.weight.float().t()) * (x_scale * self.w_scale)  # (M, N)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*lead, -1)


def to_fp8(module: nn.Module, under: str = "layers") -> int:
    """Replace every nn.Linear below `module.<under>` (the transformer layers) with Fp8Linear; the count replaced.
    Patch embedding, pooling head and projection stay as they are (small, and the most sensitive)."""
    root = module.get_submodule(under)
    targets = [
        (parent, name, child)
        for parent in root.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]
    for parent, name, child in targets:
        setattr(parent, name, Fp8Linear(child))
    return len(targets)


def fp8_parity(fp8: Tensor, reference: Tensor, labels: Tensor) -> dict:
    """FP8 image embeddings vs the reference's (N, D): min cosine, and zero-shot top-1 agreement over `labels` (K, D)
    text embeddings; `passed` when both clear the gate.

    Agreement counts the images whose reference top-1 is decided at the gate's tolerance: its cosine lead over the
    runner-up is at least 1 - FP8_MIN_COSINE. Closer calls are ties that any rounding may flip (random-weight models
    are full of them); they are reported (`ties`), not judged. No decided image: the gate fails."""
    a, b, t = (torch.nn.functional.normalize(x.float(), dim=1) for x in (fp8, reference, labels))
    cos = (a * b).sum(dim=1)  # (N,)
    sim_a, sim_b = a @ t.t(), b @ t.t()  # (N, K) cosines
    top2 = sim_b.topk(min(2, t.shape[0]), dim=1).values  # (N, 2)
    decided = (top2[:, 0] - top2[:, -1] >= 1 - FP8_MIN_COSINE) if t.shape[0] > 1 else torch.ones_like(cos, dtype=bool)
    agree = sim_a.argmax(dim=1) == sim_b.argmax(dim=1)  # (N,)
    n = int(decided.sum())
    out = {
        "min_cosine": float(cos.min()),
        "top1_agreement": float(agree[decided].float().mean()) if n else None,
        "top1_agreement_all": float(agree.float().mean()),
        "images": int(a.shape[0]),
        "decided": n,
        "ties": int(a.shape[0]) - n,
        "labels": int(t.shape[0]),
    }
    out["passed"] = bool(n and out["min_cosine"] >= FP8_MIN_COSINE and out["top1_agreement"] >= FP8_MIN_AGREEMENT)
    return out
