"""Kubernetes sidecar: stop a tritonserver that is broken, not one that is busy, so the kubelet restarts it.

A dead or frozen Python stub keeps its model "ready" in Triton 2.51, so the HTTP probes never see it. Every
CLIP_WATCH_INTERVAL seconds this runs the one health check of clip_server.probe (the local supervisor's and compose's
too): every model ready AND one real zero_shot inference. A refusal by the queue policy (503) or a late answer is
busy, and healthy, while Triton's counters show executions; no execution for CLIP_HEALTH_STALL seconds while requests
wait is broken, like an error or a wrong answer. Once a check has passed, CLIP_WATCH_FAILURES broken checks in a row
SIGTERM the tritonserver process (the pod shares one process namespace; both containers run as the same user), or
the process CLIP_WATCH_PID when set.
"""

import os
import signal
import sys
import time

from clip_server.probe import BROKEN, OK, Verdict, from_env  # installed in the server image next to clip_runtime

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


def say(text: str) -> None:
    """One line on stderr (the container log)."""
    print(text, file=sys.stderr, flush=True)


def main() -> None:
    """Check forever; stop tritonserver after FAILURES consecutive broken checks (armed by the first success)."""
    check = from_env()
    armed, failed = False, 0
    while True:
        try:
            verdict = check.check()
        except Exception as exc:  # noqa: BLE001 - a failure of the check itself counts as broken
            verdict = Verdict(BROKEN, f"{type(exc).__name__}: {exc}")
        if verdict.state == OK:
            if not armed:
                say("inference check passed: watching")
            armed, failed = True, 0
        elif verdict.state != BROKEN:
            say(f"busy, not broken: {verdict.reason}")
            failed = 0
        elif armed:
            failed += 1
            say(f"inference check failed ({failed}/{FAILURES}): {verdict.reason}")
            if failed >= FAILURES:
                pids = tritonserver_pids()
                say(f"{failed} inference checks failed: stopping tritonserver {pids}")
                for pid in pids:
                    os.kill(pid, signal.SIGTERM)
                armed, failed = False, 0
                check = from_env()
        time.sleep(INTERVAL)


if __name__ == "__main__":
    main()
