"""GPU utilisation and memory, sampled by `nvidia-smi` in the background; measurements mark time windows (phases)."""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)

QUERY = "utilization.gpu,memory.used"
INFO_QUERY = "name,driver_version,memory.total"


def parse_sample(line: str) -> tuple[float, float] | None:
    """One `nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits` line -> (util %, MiB)."""
    fields = [f.strip() for f in line.split(",")]
    if len(fields) < 2:
        return None
    try:
        return float(fields[0]), float(fields[1])
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


class GpuMonitor:
    """Samples GPU 0 every `interval_ms` while running; `phase(name)` records a window, `summary(name)` reads it."""

    def __init__(self, reason: str | None = None):
        self.reason = reason  # why nothing is sampled (None: sampling)
        self.samples: list[tuple[float, float, float]] = []  # (monotonic s, util %, memory MiB)
        self.windows: dict[str, tuple[float, float]] = {}
        self.info: dict[str, str] = {}
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def start(cls, interval_ms: int = 200) -> GpuMonitor:
        """A sampling monitor, or an idle one saying why (no nvidia-smi, or it fails)."""
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return cls("nvidia-smi not found: GPU utilisation not measured")
        info = subprocess.run(
            [smi, "--id=0", f"--query-gpu={INFO_QUERY}", "--format=csv,noheader"], capture_output=True, text=True
        )
        if info.returncode != 0:
            return cls(f"nvidia-smi failed: {(info.stderr or info.stdout).strip()[:200]}")
        monitor = cls()
        monitor.info = dict(zip(INFO_QUERY.split(","), (f.strip() for f in info.stdout.splitlines()[0].split(","))))
        monitor._proc = subprocess.Popen(
            [smi, "--id=0", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", f"--loop-ms={interval_ms}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        monitor._thread = threading.Thread(target=monitor._read, daemon=True)
        monitor._thread.start()
        return monitor

    def _read(self) -> None:
        for line in self._proc.stdout:
            self.add(time.monotonic(), line)

    def add(self, when: float, line: str) -> None:
        """Record one nvidia-smi line taken at `when` (monotonic seconds)."""
        sample = parse_sample(line)
        if sample is not None:
            self.samples.append((when, *sample))

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Mark the time window of one measurement."""
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.windows[name] = (t0, time.monotonic())

    def summary(self, name: str) -> dict:
        """Mean and peak utilisation, peak memory inside the phase `name`; or why there is none."""
        if self.reason is not None:
            return {"measured": False, "reason": self.reason}
        t0, t1 = self.windows[name]
        inside = [(u, m) for t, u, m in self.samples if t0 <= t <= t1]
        if not inside:
            return {"measured": False, "reason": f"no nvidia-smi sample inside {t1 - t0:.1f} s"}
        utils = [u for u, _ in inside]
        return {
            "measured": True,
            "samples": len(inside),
            "util_mean_pct": round(sum(utils) / len(utils), 1),
            "util_max_pct": max(utils),
            "memory_max_mib": max(m for _, m in inside),
        }

    def stop(self) -> None:
        """Stop sampling."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._thread is not None:
            self._thread.join(5)
