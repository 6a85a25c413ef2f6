"""`clip-triton serve`: run the embedded tritonserver on a model repository until Ctrl-C / SIGTERM."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from .tritonserver import TritonServer, TritonServerError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Options of `clip-triton serve`."""
    parser.add_argument("--repository", required=True, help="model repository written by `clip-triton build`")
    parser.add_argument("--host", default="127.0.0.1", help="address HTTP, gRPC and metrics bind to")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for every model")
    parser.add_argument("--log-file", default=None, help="server log (default: a temporary file, echoed on failure)")
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")


def serve(repository: str | Path, *, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
          metrics_port: int = 8002, startup_timeout: float = 300.0, log_file: str | None = None,
          log_verbose: int = 0, stop_event: threading.Event | None = None, out=sys.stdout) -> int:
    """Start, wait for every model, print the endpoints, block until a signal or `stop_event`; return an exit code."""
    server = TritonServer(repository, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          log_path=log_file, log_verbose=log_verbose, startup_timeout=startup_timeout,
                          die_with_parent=True)
    stop = stop_event or threading.Event()
    received: list[int] = []

    def on_signal(signum, _frame):
        received.append(signum)
        stop.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        server.start()
        try:
            seconds = server.wait_ready()
        except TritonServerError as exc:
            log.error("%s", exc)
            if not log_file:
                log.error("full server log: %s", server.log_path)
            return 1
        info_path = Path(repository) / "clip_triton.json"
        model_id = json.loads(info_path.read_text())["model_id"] if info_path.is_file() else "?"
        print(f"tritonserver ready in {seconds:.1f}s: {len(server.models)} models ({', '.join(server.models)}), "
              f"model_id {model_id}", file=out)
        print(f"  HTTP     http://{server.http_url}", file=out)
        print(f"  gRPC     {server.grpc_url}", file=out)
        print(f"  metrics  {server.metrics_url}", file=out)
        print(f"  log      {server.log_path}", file=out)
        print("Ctrl-C to stop.", file=out, flush=True)
        ticks = 0
        while not stop.wait(1.0):
            ticks += 1
            if not server.running:
                log.error("tritonserver exited unexpectedly (code %s):\n%s", server.process.returncode,
                          server.log_text()[-4000:])
                return 1
            gone = server.not_ready_models() if ticks % 5 == 0 else []
            if gone:  # a crashed python stub is not restarted and /v2/health stays 200: watch the models
                log.error("models no longer ready: %s; stopping", gone)
                return 1
        log.info("signal %s: stopping tritonserver", received[0] if received else "stop")
        return 0
    finally:
        code = server.stop()
        log.debug("tritonserver exit code %s", code)
        if code == 0 and not log_file:
            server.close()  # drop our temporary log; on failure it stays for the user to read
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(args: argparse.Namespace, command: str) -> int:
    """Entry point of `clip-triton serve`."""
    try:
        return serve(args.repository, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                     metrics_port=args.metrics_port, startup_timeout=args.startup_timeout, log_file=args.log_file,
                     log_verbose=args.log_verbose)
    except TritonServerError as exc:
        log.error("%s", exc)
        return 1
