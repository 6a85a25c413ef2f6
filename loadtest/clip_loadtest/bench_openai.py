"""`clip-triton bench-openai`: the OpenAI front end against our gRPC client, same server, same texts, one run.

N closed-loop callers of single texts (default 8) through `clip-triton openai` (HTTP keep-alive, base64 answers, as
the SDK asks) vs N callers of CLIPClient over gRPC straight to Triton; the two alternate in rounds so that a noisy
machine hurts both alike. Targets (issue 21): front-end throughput >= 0.9x the client's, p50 added <= 2 ms (also
measured with one caller, where queueing does not hide it). Writes a JSON report; docs/benchmarks.md has the numbers.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from .bench import LoadResult, _machine, closed_loop, wait_idle
from .workload import short_prompts

log = logging.getLogger(__name__)

COMMAND_HELP = {"bench-openai": "benchmark the OpenAI-compatible front end against the gRPC client"}
TARGET_RATIO = 0.9
TARGET_ADDED_P50_MS = 2.0


class OpenAICaller:
    """encode_text(batch) over POST /v1/embeddings, one keep-alive connection per thread (what closed_loop calls)."""

    def __init__(self, port: int, model: str, key: str):
        self.port, self.model, self.key = port, model, key
        self.local = threading.local()

    def encode_text(self, texts: list[str], normalize: bool = False) -> list:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        body = json.dumps({"model": self.model, "input": texts, "encoding_format": "base64"})
        conn.request(
            "POST",
            "/v1/embeddings",
            body=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.key}"},
        )
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
        return json.loads(data)["data"]

    def close(self) -> None:
        pass


def _summary(runs: list[LoadResult]) -> dict:
    lat = sorted(x for r in runs for x in r.latencies_ms)
    return {
        "items_per_s": statistics.median(r.items_per_s for r in runs),
        "rounds": [r.items_per_s for r in runs],
        "p50_ms": statistics.median(lat) if lat else None,
        "p99_ms": lat[int(0.99 * (len(lat) - 1))] if lat else None,
        "requests": sum(r.requests for r in runs),
        "errors": sum(r.errors for r in runs),
    }


def measure(grpc_url: str, port: int, model: str, key: str, concurrency: int, seconds: float, rounds: int) -> dict:
    """Alternating rounds of gRPC-client and front-end callers; medians of the rounds."""
    from clip_client import CLIPClient

    texts = short_prompts(256)
    grpc_runs, api_runs = [], []
    closed_loop(lambda: CLIPClient(f"grpc://{grpc_url}"), "text", texts, concurrency, 2.0)  # warm-up
    closed_loop(lambda: OpenAICaller(port, model, key), "text", texts, concurrency, 2.0)
    for _ in range(rounds):
        grpc_runs.append(closed_loop(lambda: CLIPClient(f"grpc://{grpc_url}"), "text", texts, concurrency, seconds))
        api_runs.append(closed_loop(lambda: OpenAICaller(port, model, key), "text", texts, concurrency, seconds))
    grpc, api = _summary(grpc_runs), _summary(api_runs)
    return {
        "concurrency": concurrency,
        "grpc_client": grpc,
        "openai": api,
        "ratio": api["items_per_s"] / grpc["items_per_s"] if grpc["items_per_s"] else None,
        "added_p50_ms": api["p50_ms"] - grpc["p50_ms"] if api["p50_ms"] and grpc["p50_ms"] else None,
    }


def _repository(args, tmp: Path) -> Path:
    if args.repository:
        return Path(args.repository)
    from clip_build.convert import convert
    from clip_build.repository import build_repository
    from clip_build.synthetic import make_random_checkpoint

    checkpoint = make_random_checkpoint(tmp / "checkpoint", "clip", size=args.size)
    convert(checkpoint, tmp / "weights")
    return build_repository(tmp / "weights", tmp / "repository")


def _wait_health(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the front end did not become healthy")


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Options of `clip-triton bench-openai`."""
    parser.add_argument("--repository", default=None, help="model repository (default: build a random-weight one)")
    parser.add_argument("--size", default="base", choices=("tiny", "base"), help="random model size without one")
    parser.add_argument("--concurrency", type=int, default=8, help="callers of each kind")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per round and kind")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians reported)")
    parser.add_argument("--out", default="openai_bench.json", help="JSON report")
    parser.add_argument("--wait-idle", type=float, default=60.0, help="seconds to wait for load average < 1")


def run(args: argparse.Namespace, command: str) -> int:
    """Entry point of `clip-triton bench-openai`."""
    from clip_server import TritonServer, free_port

    key = "bench-key-0123456789"
    with tempfile.TemporaryDirectory(prefix="clip-bench-openai-") as tmp:
        repo = _repository(args, Path(tmp))
        server = TritonServer(repo)
        server.start()
        front = None
        try:
            server.wait_ready(300)
            port = free_port()
            front = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "clip_server.openai_api",
                    "--upstream",
                    f"grpc://{server.grpc_url}",
                    "--port",
                    str(port),
                    "--api-key",
                    key,
                    "--log-level",
                    "warning",
                ]
            )
            _wait_health(port, front)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {key}"})
            model = json.loads(conn.getresponse().read())["data"][0]["id"]
            load = wait_idle(args.wait_idle, 1.0)
            results = {
                "machine": _machine(),
                "load_average_before": load,
                "model_size": args.size,
                "runs": [
                    measure(server.grpc_url, port, model, key, c, args.seconds, args.rounds)
                    for c in sorted({1, args.concurrency})
                ],
            }
        finally:
            if front is not None:
                front.terminate()
                front.wait(15)
            server.stop()
    main = results["runs"][-1]
    one = results["runs"][0]
    results["checks"] = {
        f"throughput ratio at {main['concurrency']} callers >= {TARGET_RATIO}": main["ratio"] >= TARGET_RATIO,
        f"p50 added (1 caller) <= {TARGET_ADDED_P50_MS} ms": one["added_p50_ms"] <= TARGET_ADDED_P50_MS,
        f"p50 added ({main['concurrency']} callers) <= {TARGET_ADDED_P50_MS} ms": main["added_p50_ms"]
        <= TARGET_ADDED_P50_MS,
    }
    Path(args.out).write_text(json.dumps(results, indent=2))
    for r in results["runs"]:
        print(
            f"{r['concurrency']} callers: gRPC client {r['grpc_client']['items_per_s']:.1f}/s p50 "
            f"{r['grpc_client']['p50_ms']:.2f} ms | OpenAI front end {r['openai']['items_per_s']:.1f}/s p50 "
            f"{r['openai']['p50_ms']:.2f} ms | ratio {r['ratio']:.3f}, p50 added {r['added_p50_ms']:.2f} ms"
        )
    for name, ok in results["checks"].items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clip-triton bench-openai", description=COMMAND_HELP["bench-openai"])
    add_arguments(parser, "bench-openai")
    logging.basicConfig(level=logging.INFO)
    return run(parser.parse_args(argv), "bench-openai")
