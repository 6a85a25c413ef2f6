"""Helpers shared by the serving tests: raw tritonclient inference and reading `clip-triton serve` start-up output."""

from __future__ import annotations

import subprocess
import time

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient


def infer(client, protocol: str, model: str, inputs: dict[str, np.ndarray], outputs: list[str],
          headers: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """One raw tritonclient call: numpy inputs by name -> the requested outputs by name."""
    mod = httpclient if protocol == "http" else grpcclient
    tensors = []
    for name, array in inputs.items():
        dtype = "BYTES" if array.dtype == object else {"int32": "INT32", "float32": "FP32"}[array.dtype.name]
        t = mod.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        tensors.append(t)
    result = client.infer(model, tensors, outputs=[mod.InferRequestedOutput(n) for n in outputs], headers=headers)
    return {n: result.as_numpy(n) for n in outputs}


def wait_until(condition, timeout: float, interval: float = 0.05) -> bool:
    """Poll `condition()` until it is true (True) or `timeout` seconds passed (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def read_until_ready(proc: subprocess.Popen, timeout: float = 120) -> list[str]:
    """stdout lines of `clip-triton serve` up to its "Ctrl-C to stop." line (or EOF / timeout)."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Ctrl-C to stop" in line:
            break
    return lines
