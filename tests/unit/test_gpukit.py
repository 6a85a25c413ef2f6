"""The GPU kit's pieces that need no GPU: nvidia-smi samples and the phase windows they are read in."""

from __future__ import annotations

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
