"""`build --dtype auto`: the encoders' dtype for the serving hardware, and why.

GPU builds: bf16 where the GPU has it (Ampere and newer), fp16 on older GPUs. CPU builds: bf16 only where the CPU has
native bf16 instructions (AVX512-BF16 or AMX) AND a short calibration (a transformer block's matmuls, fp32 vs bf16, on
this machine) measured bf16 faster by BF16_MIN_SPEEDUP; fp32 everywhere else (without those instructions torch
emulates bf16 matmuls: 4-6x slower than fp32, measured on an AVX2-only EPYC). fp32 stays the exact choice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names
BF16_MIN_SPEEDUP = 1.3  # bf16 must beat fp32 by this much in the calibration (a margin for timing noise)


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype `--dtype auto` picked, and the reason logged and recorded in clip_triton.json."""

    dtype: str
    reason: str
    speedup: float | None = None  # bf16 over fp32 in the calibration, where one ran

    def as_dict(self) -> dict:
        """JSON-ready fields."""
        return {
            "requested": "auto",
            "dtype": self.dtype,
            "reason": self.reason,
            "calibration_bf16_speedup": None if self.speedup is None else round(self.speedup, 2),
        }


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (the first `flags` line of /proc/cpuinfo; empty where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def calibrate_bf16(hidden: int = 768, tokens: int = 400, reps: int = 6) -> float:
    """bf16 over fp32 throughput of a transformer block's linear layers on this CPU (a few hundred ms)."""
    import torch

    layers = [(hidden, 3 * hidden), (hidden, hidden), (hidden, 4 * hidden), (4 * hidden, hidden)]
    gen = torch.Generator().manual_seed(0)
    x32 = torch.randn(tokens, hidden, generator=gen)
    w32 = [torch.randn(o, i, generator=gen) / i**0.5 for i, o in layers]

    def run(dtype: torch.dtype) -> float:
        x, ws = x32.to(dtype), [w.to(dtype) for w in w32]
        x4 = x.repeat(1, 4)  # (tokens, 4 hidden): fc2's input
        best = float("inf")
        with torch.inference_mode():
            for rep in range(reps + 1):
                t0 = time.perf_counter()
                for w in ws:
                    torch.nn.functional.linear(x if w.shape[1] == hidden else x4, w)
                if rep:  # the first pass warms oneDNN's kernel cache
                    best = min(best, time.perf_counter() - t0)
        return best

    return run(torch.float32) / run(torch.bfloat16)


def cuda_bf16() -> bool | None:
    """Whether the visible GPU runs bf16 natively; None where torch sees no CUDA device."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return bool(torch.cuda.is_bf16_supported())


def choose_dtype(
    instance_kind: str,
    *,
    flags: set[str] | None = None,
    calibrate: Callable[[], float] = calibrate_bf16,
    gpu_bf16: Callable[[], bool | None] = cuda_bf16,
) -> DtypeChoice:
    """The encoders' dtype for `instance_kind` ("cpu" | "gpu") on this machine (see the module docstring)."""
    if instance_kind == "gpu":
        native = gpu_bf16()
        if native is None:
            return DtypeChoice(
                "bf16",
                "GPU build, no CUDA device visible to the build: bf16 (Ampere or newer "
                "assumed; pass --dtype fp16 for older GPUs)",
            )
        if native:
            return DtypeChoice("bf16", "GPU build: the visible GPU runs bf16 natively")
        return DtypeChoice("fp16", "GPU build: the visible GPU lacks native bf16 (pre-Ampere): fp16")
    if instance_kind != "cpu":
        raise ValueError(f"instance_kind must be cpu or gpu, not {instance_kind!r}")
    flags = cpu_flags() if flags is None else flags
    native = [f for f in NATIVE_BF16_FLAGS if f in flags]
    if not native:
        return DtypeChoice(
            "fp32",
            f"CPU build: this CPU has no native bf16 ({' / '.join(NATIVE_BF16_FLAGS)} "
            "absent), where bf16 runs slower than fp32: fp32",
        )
    speedup = calibrate()
    if speedup >= BF16_MIN_SPEEDUP:
        return DtypeChoice(
            "bf16",
            f"CPU build: {', '.join(native)} present and bf16 measured {speedup:.2f}x fp32 "
            f"(>= {BF16_MIN_SPEEDUP}x): bf16",
            speedup,
        )
    return DtypeChoice(
        "fp32",
        f"CPU build: {', '.join(native)} present but bf16 measured only {speedup:.2f}x fp32 "
        f"(< {BF16_MIN_SPEEDUP}x): fp32",
        speedup,
    )


def resolve_dtype(dtype: str, instance_kind: str) -> tuple[str, DtypeChoice | None]:
    """`dtype` as given, or for "auto" the chosen one (logged) with its DtypeChoice."""
    if dtype != "auto":
        return dtype, None
    choice = choose_dtype(instance_kind)
    log.info("--dtype auto -> %s: %s", choice.dtype, choice.reason)
    return choice.dtype, choice
