"""The GPU kit's pieces that need no GPU: nvidia-smi samples and the phase windows they are read in."""

from __future__ import annotations

import os
import time

from clip_loadtest.gpukit.gpu import GpuMonitor, parse_sample


def test_parse_sample():
    assert parse_sample("37, 1234\n") == (37.0, 1234.0)
    assert parse_sample("[N/A], [N/A]") is None
    assert parse_sample("garbage") is None


def test_summary_reads_only_the_phase_window():
    monitor = GpuMonitor()
    monitor.windows["run"] = (10.0, 11.0)
    for when, line in ((9.0, "99, 1"), (10.5, "40, 100"), (10.7, "60, 200"), (10.8, "[N/A], 5"), (12.0, "100, 900")):
        monitor.add(when, line)
    assert monitor.summary("run") == {"measured": True, "samples": 2, "util_mean_pct": 50.0, "util_max_pct": 60.0,
                                      "memory_max_mib": 200.0}
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
    fake.write_text('#!/bin/sh\ncase "$*" in\n  *loop-ms*) while true; do echo "37, 1234"; sleep 0.02; done ;;\n'
                    '  *) echo "NVIDIA H100 80GB HBM3, 580.159.04, 81559 MiB" ;;\nesac\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monitor = GpuMonitor.start(interval_ms=20)
    try:
        assert monitor.info == {"name": "NVIDIA H100 80GB HBM3", "driver_version": "580.159.04",
                                "memory.total": "81559 MiB"}
        with monitor.phase("run"):
            deadline = time.monotonic() + 10
            while len(monitor.samples) < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
        summary = monitor.summary("run")
    finally:
        monitor.stop()
    assert summary["measured"] and summary["util_mean_pct"] == 37.0 and summary["memory_max_mib"] == 1234.0
