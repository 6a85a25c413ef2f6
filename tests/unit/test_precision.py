"""`build --dtype auto`: the decision from CPU flags, a calibration and the GPU's bf16 support (all injected here)."""

from __future__ import annotations

import pytest

from clip_build.precision import BF16_MIN_SPEEDUP, choose_dtype, cpu_flags


def _never() -> float:
    raise AssertionError("calibration must not run without native bf16")


@pytest.mark.parametrize(
    ("flags", "speedup", "dtype"),
    [
        ({"avx2", "avx512f"}, None, "fp32"),  # no native bf16: no calibration, fp32
        ({"avx2", "avx512_bf16"}, 2.4, "bf16"),
        ({"amx_bf16", "amx_tile"}, BF16_MIN_SPEEDUP, "bf16"),
        ({"avx512_bf16"}, BF16_MIN_SPEEDUP - 0.01, "fp32"),  # native but not measurably faster here
    ],
)
def test_cpu_builds_pick_bf16_only_where_native_and_measured_faster(flags, speedup, dtype):
    choice = choose_dtype("cpu", flags=flags, calibrate=_never if speedup is None else (lambda: speedup))
    assert (choice.dtype, choice.speedup) == (dtype, speedup)


@pytest.mark.parametrize(("native", "dtype"), [(True, "bf16"), (False, "fp16"), (None, "bf16")])
def test_gpu_builds_pick_bf16_or_fp16_by_the_visible_gpu(native, dtype):
    assert choose_dtype("gpu", flags=set(), calibrate=_never, gpu_bf16=lambda: native).dtype == dtype


def test_the_reason_names_what_decided():
    choice = choose_dtype("cpu", flags={"avx512_bf16"}, calibrate=lambda: 1.1)
    assert "1.10x" in choice.reason and choice.as_dict()["calibration_bf16_speedup"] == 1.1


def test_cpu_flags_reads_the_flags_line():
    assert cpu_flags("processor: 0\nflags\t\t: fpu avx2 avx512_bf16\n") == {"fpu", "avx2", "avx512_bf16"}
