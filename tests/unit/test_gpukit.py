"""The GPU kit's pieces that need no GPU: nvidia-smi samples and the phase windows they are read in, the report."""

from __future__ import annotations

import os
import time

from clip_loadtest.gpukit.gpu import GpuMonitor, parse_sample
from clip_loadtest.gpukit.report import render
from clip_loadtest.gpukit.run import evaluate


def test_parse_sample():
    assert parse_sample("37, 1234\n") == (37.0, 1234.0)
    assert parse_sample("[N/A], [N/A]") is None
    assert parse_sample("garbage") is None


def test_summary_reads_only_the_phase_window():
    monitor = GpuMonitor()
    monitor.windows["run"] = (10.0, 11.0)
    for when, line in ((9.0, "99, 1"), (10.5, "40, 100"), (10.7, "60, 200"), (10.8, "[N/A], 5"), (12.0, "100, 900")):
        monitor.add(when, line)
    assert monitor.summary("run") == {
        "measured": True,
        "samples": 2,
        "util_mean_pct": 50.0,
        "util_max_pct": 60.0,
        "memory_max_mib": 200.0,
    }
    monitor.windows["idle"] = (20.0, 21.0)
    assert monitor.summary("idle")["measured"] is False


def test_no_gpu_says_why():
    monitor = GpuMonitor("--device cpu: no GPU")
    with monitor.phase("run"):
        pass
    assert monitor.summary("run") == {"measured": False, "reason": "--device cpu: no GPU"}
    monitor.stop()


def test_start_samples_a_running_nvidia_smi(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"  # stands in for the driver's tool, which this machine does not have
    fake.write_text(
        '#!/bin/sh\ncase "$*" in\n  *loop-ms*) while true; do echo "37, 1234"; sleep 0.02; done ;;\n'
        '  *) echo "NVIDIA H100 80GB HBM3, 580.159.04, 81559 MiB" ;;\nesac\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monitor = GpuMonitor.start(interval_ms=20)
    try:
        assert monitor.info == {
            "name": "NVIDIA H100 80GB HBM3",
            "driver_version": "580.159.04",
            "memory.total": "81559 MiB",
        }
        with monitor.phase("run"):
            deadline = time.monotonic() + 10
            while len(monitor.samples) < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
        summary = monitor.summary("run")
    finally:
        monitor.stop()
    assert summary["measured"] and summary["util_mean_pct"] == 37.0 and summary["memory_max_mib"] == 1234.0


def test_report_shows_the_gpu_decode_build():
    """What a device run writes for --image-decode gpu (shapes as run.py and decode_check produce them)."""
    e2e = {
        "kind": "image",
        "concurrency": 16,
        "items_per_request": 64,
        "requests": 700,
        "errors": 0,
        "seconds": 8.0,
        "items_per_s": 5600.0,
        "p50_ms": 180.0,
        "p95_ms": 200.0,
        "p99_ms": 230.0,
        "gpu": {"measured": True, "samples": 40, "util_mean_pct": 61.0, "util_max_pct": 80.0, "memory_max_mib": 9000.0},
        "models": {
            "image_encoder": {
                "requests": 700,
                "executions": 300,
                "mean_batch": 150.0,
                "queue_ms": 2.0,
                "compute_ms_per_exec": 9.0,
                "compute_ms_per_item": 0.06,
            }
        },
    }
    check = {
        "device": "cuda:0",
        "torch": "2.11.0+cu130",
        "items": 37,
        "seconds": 0.2,
        "routed": {"gpu": 32, "cpu": 6, "refused": 0},
        "fallback_identical": {"png": True},
        "errors_match": {"empty": True},
        "max_diff_levels": 3,
        "mean_diff_levels": 0.3,
        "p999_diff_levels": 2.0,
        "max_diff_normalised": 0.045,
        "jpeg_sizes": "224x224",
        "ok": True,
    }
    plan = {
        "image_instances": 4,
        "text_instances": 2,
        "decode_threads": 2,
        "image_decode": "gpu",
        "rule": "auto",
        "cores": 16,
    }
    results = {
        "device": "cuda",
        "command": "run_kit.py",
        "date": "today",
        "elapsed_s": 200.0,
        "plan": {
            "size": "base",
            "max_batch_size": 256,
            "instance_count": 4,
            "concurrency": 16,
            "per_request": 64,
            "duration_s": 8.0,
            "image_sizes": "640x480",
        },
        "dtypes": {},
        "gpu_decode": {
            "dtype": "bf16",
            "errors": [],
            "skipped": [],
            "decode_check": check,
            "build_s": 4.0,
            "preprocess": plan,
            "parity": {"image": 0.9999},
            "vs_exact_path": {"image": 0.99998},
            "e2e": {"image": e2e},
            "server_args": ["--cuda-memory-pool-byte-size=0:1233125376"],
        },
    }
    checks = evaluate(results, "cuda")
    verdicts = {c.name: c.verdict for c in checks}
    assert verdicts["end-to-end images/s through Triton, --image-decode gpu (bf16)"] == "PASS"
    assert verdicts["bf16 GPU-decode image embeddings vs fp32 CPU (min cosine)"] == "PASS"
    assert verdicts["bf16 GPU-decode image embeddings vs the exact build (min cosine)"] == "PASS"
    assert verdicts["GPU-decode pixels vs the exact path (max, 1/255 levels)"] == "n/a"  # reported, no target
    text = render(results, checks)
    assert "## --image-decode gpu" in text and "4 preprocess_image x 2 decode threads" in text
    assert "max 3/255, mean 0.3/255" in text and "vs the exact (CPU-decoding) build, min cosine: image 0.999980" in text
    assert "| end to end | image | 16 | 64 | 5,600 |" in text and "--cuda-memory-pool-byte-size" in text
    failed = {
        **results,
        "gpu_decode": {
            "dtype": "bf16",
            "errors": ["RuntimeError: nvJPEG"],
            "skipped": [],
            "decode_check": {"error": "decode_check exited 1: boom"},
        },
    }
    text = render(failed, evaluate(failed, "cuda"))
    assert "decode check: error decode_check exited 1: boom" in text and "**error:** RuntimeError: nvJPEG" in text


def _tiny_image_encoder():
    import torch

    from clip_build.modules import ImageEncoder, VisionTransformer

    torch.manual_seed(0)
    return ImageEncoder(VisionTransformer(32, 8, 3, 64, 2, 4, 128, "quick_gelu", 1e-5), 64, 32).eval()


def test_graphed_tower_buckets_pad_and_cut_back_to_the_same_embeddings():
    import pytest
    import torch

    from clip_loadtest.gpukit.fast import GraphedTower

    enc = _tiny_image_encoder()
    tower = GraphedTower(enc, (1, 4, 8))
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        got = [tower(x[:n]) for n in (1, 3, 5)]  # buckets 1, 4, 8 (padded with zero images)
        want = [enc(x[:n]) for n in (1, 3, 5)]
    assert all(torch.allclose(g, w, atol=1e-5) and g.shape == w.shape for g, w in zip(got, want))
    with pytest.raises(ValueError, match="largest bucket 8"):
        tower(torch.randn(9, 3, 32, 32))


def test_fp8_linear_layers_pass_the_parity_gate_and_a_wrong_tower_does_not():
    import copy

    import torch

    from clip_loadtest.gpukit.fast import Fp8Linear, fp8_parity, to_fp8

    enc = _tiny_image_encoder()
    fp8 = copy.deepcopy(enc).to(torch.bfloat16)
    assert to_fp8(fp8, "vision.layers") == 2 * 6  # q, k, v, out, fc1, fc2 per layer; projection untouched
    assert isinstance(fp8.vision.layers[0].mlp.fc1, Fp8Linear) and not isinstance(fp8.visual_projection, Fp8Linear)
    x, labels = torch.randn(6, 3, 32, 32), torch.randn(10, 32)
    with torch.no_grad():
        ref = enc(x)
        good = fp8_parity(fp8(x), ref, labels)
        bad = fp8_parity(ref.flip(0), ref, labels)  # other images' embeddings
    assert (good["passed"], bad["passed"]) == (True, False)


def test_fp8_gate_judges_only_decided_top1s():
    import torch

    from clip_loadtest.gpukit.fast import fp8_parity

    ref = torch.eye(4, 8)  # image i points at label i
    tied = torch.cat([torch.eye(4, 8), torch.eye(4, 8)])  # every label twice: each top-1 is a tie
    clear, ties = fp8_parity(ref, ref, torch.eye(4, 8)), fp8_parity(ref, ref, tied)
    assert [(g["decided"], g["ties"], g["passed"]) for g in (clear, ties)] == [(4, 0, True), (0, 4, False)]
