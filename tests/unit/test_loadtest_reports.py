"""The benchmark's Markdown report and the soak's verdict, from fixed results (no server, no load)."""

from __future__ import annotations

import argparse

from clip_loadtest import bench, soak

ROWS = [
    {
        "kind": "image",
        "concurrency": 8,
        "items_per_request": 1,
        "items_per_s": 20.5,
        "p50_ms": 300.2,
        "p95_ms": 410.0,
        "p99_ms": 500.9,
        "errors": 0,
    }
]


def _results(**extra) -> dict:
    machine = {
        "cpu": "Zen 4",
        "cores": 2,
        "isa": [],
        "memory_gb": 8,
        "os": "Linux",
        "python": "3.11",
        "torch": "2.13",
        "transformers": "5.24",
        "tritonclient": "2.55",
        "numpy": "1.26",
        "PIL": "13",
    }
    return {
        "machine": machine,
        "command": "clip-triton bench --quick",
        "weights_desc": "clip",
        "date": "2026-01-01",
        "elapsed_s": 12.3,
        "image_sizes": "224x224",
        "in_process": {"image": {8: 10.0}, "text": {8: 30.0}},
        "triton": {"fp32": {"client": ROWS, "errors": ["upstream died"]}},
        **extra,
    }


def test_report_sections_in_order_with_the_measured_rows():
    checks = [bench.Check("served / in-process", 1.5, ">= 1x", True, "", "x")]
    text = bench.render_markdown(_results(), checks, "kept notes")
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections == [
        "## Machine",
        "## Reproduce",
        "## Targets",
        "## In-process transformers (the baseline)",
        "## Triton (closed loop: N callers, one request after the other)",
        "## Where the time goes (Triton model statistics over each run)",
        "## Notes",
    ]
    assert "| 8 | 10.0 | 30.0 |" in text
    assert "| client fp32 | image | 8 | 1 | 20.5 | 300 | 410 | 501 | 0 |" in text
    assert "**fp32 run error:** upstream died" in text
    assert "| served / in-process | 1.50x | >= 1x | **PASS** |  |" in text
    assert text.endswith("\n".join([bench.NOTES_BEGIN, "kept notes", bench.NOTES_END, ""]))


def test_report_adds_preprocessing_and_the_plot_only_when_measured():
    pre = {
        "hf_class": "CLIPImageProcessor",
        "hf_ms": 5.0,
        "ours_ms": 2.0,
        "speedup": 2.5,
        "max_diff_levels": 0.0,
        "served_threads": 2,
        "served_ms": 1.0,
        "served_speedup": 5.0,
        "draft4_ms": 0.5,
        "draft4_speedup": 10.0,
        "draft4_max_diff_levels": 1.5,
        "images": 24,
    }
    plain = bench.render_markdown(_results(), [], "")
    full = bench.render_markdown(_results(preprocessing=pre, plot="/tmp/x/benchmarks.png"), [], "")
    assert "Image preprocessing alone" not in plain and "![" not in plain
    assert "- ours (clip_runtime.image, exact): 2.00 ms/image, 2.50x, max difference 0.000/255" in full
    assert "![throughput and latency](benchmarks.png)" in full


def test_server_env_items():
    assert bench._server_env(["A=1", "B=x=y"]) == {"A": "1", "B": "x=y"}
    assert bench._server_env(["A"]) is None


def _soak(**changes) -> dict:
    args = argparse.Namespace(minutes=1.0, protocol="http", users=2, mix="text=1")
    stats = {
        "Aggregated": {"Request Count": "10", "Failure Count": "0", "Requests/s": "3.33", "95%": "40"},
        "encode_text": {"Request Count": "10", "Failure Count": "0", "95%": "40"},
    }
    result = soak._summary(args, 0, stats, None, 61.04)
    result.update(changes)
    return result


def test_soak_summary_from_locust_stats():
    result = _soak()
    assert (result["requests"], result["failures"], result["rps"], result["elapsed_s"]) == (10, 0, 3.3, 61.0)
    assert result["per_ensemble"] == {"encode_text": {"requests": 10, "failures": 0, "p95_ms": "40"}}
    assert (result["bad_inputs_refused"], result["bad_inputs_unexpected_count"]) == (0, 0)


def test_soak_passes_only_without_failures_dead_stubs_or_rss_growth():
    assert soak._passed(_soak(), max_growth_pct=5.0)
    assert soak._passed(_soak(rss={"growth_pct": 4.9}), max_growth_pct=5.0)
    for bad in (
        {"failures": 1},
        {"requests": 0},
        {"bad_inputs_unexpected_count": 1},
        {"dead_stubs": ["x"]},
        {"models_not_ready": ["encode_text"]},
        {"rss": {"growth_pct": 5.0}},
    ):
        assert not soak._passed(_soak(**bad), max_growth_pct=5.0), bad


def _served_run(online: float, bulk: float, busy: float) -> dict:
    stats = {
        "text_encoder": {
            "mean_batch": 7.5,
            "compute_ms_per_item": 20.0,
            "queue_ms": 3.0,
            "busy": busy,
            "compute_ms_per_exec": 150.0,
        },
        "preprocess_text": {"compute_ms_per_exec": 1.2},
    }
    rows = [{**ROWS[0], "kind": kind, "items_per_s": online} for kind in ("image", "text")]
    return {
        "client": rows,
        "bulk": {k: {"items_per_s": bulk} for k in ("image", "text")},
        "stats": {"text@8": stats, "text@bulk": stats},
        "rss_after_bulk_mb": 1400.0,
        "cold_start_s": 3.0,
    }


def test_online_and_bulk_targets_are_ratios_and_a_miss_says_what_limits_it():
    results = _results(
        in_process={"image": {8: 10.0, 32: 20.0}, "text": {8: 30.0, 32: 60.0}},
        triton={"fp32": _served_run(online=31.0, bulk=45.0, busy=0.6)},
        reduced_precision={"reason": "no native bf16"},
    )
    checks = {c.name: c for c in bench.evaluate(results)}
    online = checks["fp32 online texts: 8 callers x 1 vs in-process fp32 batch 8"]
    bulk = checks["fp32 bulk texts: one call vs in-process fp32 best"]
    assert (online.verdict, round(online.value, 3)) == ("PASS", round(31 / 30, 3))
    assert (bulk.verdict, bulk.value) == ("MISS", 0.75)
    assert "limit: the encoder idles 40% of the run" in bulk.detail
    assert checks["reduced precision (bulk >= 3x in-process fp32 best)"].detail == "not measured: no native bf16"
    assert checks["whole-server RSS after the bulk calls (fp32)"].verdict == "PASS"


def test_a_busy_encoder_is_named_as_the_limit():
    stats = _served_run(online=1.0, bulk=1.0, busy=0.97)["stats"]["text@8"]
    assert bench.limiter(stats, "text", 50.0).endswith("limit: encoder compute (busy 97% of the run)")


def test_the_matrix_fills_measured_cpu_rows_and_marks_the_rest():
    towers = {"image": {1: 5.0, 8: 10.0, 64: None}, "text": {1: 20.0, 8: 60.0, 64: 90.0}}
    lines = bench._matrix_lines(_results(triton={"fp32": {"towers": towers}}, reduced_precision={"reason": "no bf16"}))
    rows = [line for line in lines if line.startswith("| ViT")]
    assert len(rows) == len(bench.MATRIX_MODELS) * len(bench.MATRIX_PRECISIONS) * (1 + len(bench.MATRIX_DEVICES))
    assert "| ViT-B/32 | fp32 | CPU (2 cores, no AVX-512) | 5.0 / 20.0 | 10.0 / 60.0 | - / 90.0 |" in rows
    assert "| ViT-B/32 | bf16 | CPU (2 cores, no AVX-512) | not measured: no bf16 | | |" in rows
    assert all("no device lent" in r for r in rows if "| H100 |" in r or "| H200 |" in r)
