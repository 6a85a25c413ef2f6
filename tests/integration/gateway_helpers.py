"""Helpers for the gateway tests: Prometheus text parsing and running `clip-triton gateway` as a subprocess."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.triton_helpers import read_until_ready

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(url: str) -> str:
    """The Prometheus text at `url`."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def metric_names(text: str) -> set[str]:
    """Every sample name in a Prometheus exposition."""
    return {m.group(1) for line in text.splitlines() if (m := _SAMPLE.match(line))}


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) == name and labels.items() <= dict(_LABEL.findall(m.group(2) or "")).items():
            total += float(m.group(3))
    return total


_PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (label matchers, ranges, groupings and functions dropped)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\$\w+", " ", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        if m.group() not in _PROMQL_WORDS and not e[m.end() :].lstrip().startswith("("):
            names.add(m.group())
    return names


@dataclass
class GatewayProcess:
    """A running `clip-triton gateway` subprocess and its ports."""

    proc: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    output: list[str] = field(default_factory=list)  # its stdout and Envoy's log, read all along

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def metrics(self) -> str:
        return scrape(f"http://127.0.0.1:{self.metrics_port}/stats/prometheus")

    def stop(self) -> int:
        """SIGTERM, as an orchestrator would; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def start_gateway(upstreams: list[str], *options: str) -> GatewayProcess:
    """`clip-triton gateway --upstream ... --http-port P --grpc-port Q --metrics-port M *options`, once it serves."""
    from clip_server import free_port

    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    cmd = [
        sys.executable,
        "-m",
        "clip_client.cli",
        "gateway",
        *[a for u in upstreams for a in ("--upstream", u)],
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        "--metrics-port",
        str(metrics_port),
        "--concurrency",
        "2",
        *options,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    gateway = GatewayProcess(proc, http_port, grpc_port, metrics_port, read_until_ready(proc, timeout=60))
    if proc.poll() is not None or not gateway.output or "Ctrl-C to stop" not in gateway.output[-1]:
        gateway.stop()
        raise RuntimeError("gateway did not start:\n" + "".join(gateway.output) + (proc.stdout.read() or ""))
    threading.Thread(target=lambda: gateway.output.extend(proc.stdout), daemon=True).start()  # never let the pipe fill
    return gateway


def self_signed_certificate(cert: Path, key: Path, san: str) -> tuple[Path, Path]:
    """A one-day self-signed certificate for CN=localhost with subjectAltName `san` (openssl CLI); it is its own CA."""
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            f"subjectAltName={san}",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key
