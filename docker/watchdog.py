"""Kubernetes sidecar: stop a tritonserver whose models look ready but cannot infer, so the kubelet restarts it.

A dead Python stub keeps its model "ready" in Triton 24.10, so the HTTP probes never see it. Every
CLIP_WATCH_INTERVAL seconds this runs the compose health check (healthcheck.py: every model ready AND one real
zero_shot inference); once it has passed at least once, CLIP_WATCH_FAILURES failures in a row SIGTERM the
tritonserver process (the pod shares one process namespace; both containers run as the same user), or the process
CLIP_WATCH_PID when set.
"""

import os
import signal
import sys
import time

from healthcheck import main as check  # next to this file in the server image

INTERVAL = float(os.environ.get("CLIP_WATCH_INTERVAL", "15"))
FAILURES = int(os.environ.get("CLIP_WATCH_FAILURES", "3"))


def tritonserver_pids() -> list[int]:
    """CLIP_WATCH_PID, else the pids of processes named tritonserver in this (shared) process namespace."""
    if os.environ.get("CLIP_WATCH_PID"):
        return [int(os.environ["CLIP_WATCH_PID"])]
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/comm") as comm:
                if entry.isdigit() and comm.read().strip() == "tritonserver":
                    pids.append(int(entry))
        except OSError:
            pass
    return pids


def healthy() -> bool:
    """One health check; its reason on stderr when it fails."""
    try:
        return check() == 0
    except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy"
        print(f"inference check failed: {exc}", file=sys.stderr, flush=True)
        return False


def main() -> None:
    """Check forever; stop tritonserver after FAILURES consecutive failures (armed by the first success)."""
    armed, failed = False, 0
    while True:
        if healthy():
            if not armed:
                print("inference check passed: watching", file=sys.stderr, flush=True)
            armed, failed = True, 0
        elif armed:
            failed += 1
            if failed >= FAILURES:
                pids = tritonserver_pids()
                print(f"{failed} inference checks failed: stopping tritonserver {pids}", file=sys.stderr, flush=True)
                for pid in pids:
                    os.kill(pid, signal.SIGTERM)
                armed, failed = False, 0
        time.sleep(INTERVAL)


if __name__ == "__main__":
    main()
