"""`clip-triton serve`: run the embedded tritonserver on a model repository, supervised, until Ctrl-C / SIGTERM.

Secure defaults: binds 127.0.0.1; model control mode none; the admin APIs (model-repository, model-config,
shared-memory, statistics, trace, logging) answer only requests with the header `x-clip-admin-key: <key>`, the
key coming from --admin-key, else $CLIP_TRITON_ADMIN_KEY, else generated at start and printed once. Health,
metadata and inference stay open. --no-restrict opens everything (development).

Supervision: when the server process dies, any model stops being ready, a Python stub dies (Triton 24.x does not
restart it) or a real inference fails (a stub alive but stopped or hung), the server is restarted on the same ports;
more than --max-restarts restarts within --restart-window seconds end `serve` with exit code 1.

SIGTERM / Ctrl-C: the server is stopped with SIGTERM; it finishes the requests in flight (up to --exit-timeout
seconds) before it exits; `serve` then exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import sys
import threading
from pathlib import Path

from clip_build.repository import server_args

from .binary import TritonServerError
from .process import ADMIN_HEADER, RESTRICTED_APIS, StartupCancelled, TritonServer
from .supervisor import Supervisor

log = logging.getLogger(__name__)

ADMIN_KEY_ENV = "CLIP_TRITON_ADMIN_KEY"


COMMAND_HELP = {"serve": "serve a model repository on the embedded Triton server"}


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Options of `clip-triton serve`."""
    parser.add_argument("--repository", required=True, help="model repository written by `clip-triton build`")
    parser.add_argument("--host", default="127.0.0.1", help="address HTTP, gRPC and metrics bind to")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for every model")
    parser.add_argument(
        "--exit-timeout", type=int, default=30, help="seconds the server lets in-flight requests finish after SIGTERM"
    )
    parser.add_argument("--log-file", default=None, help="server log (default: a temporary file, echoed on failure)")
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    parser.add_argument(
        "--admin-key",
        default=None,
        help=f"value of the {ADMIN_HEADER} header that unlocks the admin APIs "
        f"(default: ${ADMIN_KEY_ENV}, else a random key printed at start)",
    )
    parser.add_argument(
        "--no-restrict",
        action="store_true",
        help="development: leave model-repository/model-config/statistics/... APIs open",
    )
    parser.add_argument("--no-supervise", action="store_true", help="exit 1 instead of restarting a failed server")
    parser.add_argument("--max-restarts", type=int, default=5, help="restarts allowed within --restart-window")
    parser.add_argument("--restart-window", type=float, default=300.0, help="seconds")
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="json: our log lines as JSON objects (time, level, logger, message, request_id)",
    )
    add_openai_arguments(parser)


# ------------------------------------------------------------------ the OpenAI front end beside the server
def add_openai_arguments(parser: argparse.ArgumentParser) -> None:
    """--openai-port P starts `clip-triton openai` on --host:P beside the server (its options prefixed openai-)."""
    from .openai_api import add_front_end_options, add_key_arguments

    group = parser.add_argument_group("OpenAI-compatible API (clip-triton openai) beside the server")
    group.add_argument("--openai-port", type=int, default=0, help="serve /v1/embeddings on --host:PORT (0: off)")
    add_key_arguments(group)
    add_front_end_options(group, prefix="openai-")


def start_openai(args: argparse.Namespace, host: str):
    """on_ready hook: the front end in a thread, its upstream the local server's gRPC port; None without the flag."""
    if not getattr(args, "openai_port", 0):
        return None
    from .openai_api import FrontEndThread, options_from_args, settings_from_args, uvicorn_server

    def on_ready(server, _supervisor):
        opt = options_from_args(args, "openai-")
        settings = settings_from_args(args, [server.grpc_url], "openai-")
        thread = FrontEndThread(
            uvicorn_server(
                settings,
                host,
                args.openai_port,
                tls_cert=opt["tls_cert"],
                tls_key=opt["tls_key"],
                log_level=opt["log_level"],
            )
        )
        thread.start()
        started.append(thread)
        scheme = "https" if opt["tls_cert"] else "http"
        print(f"  OpenAI   {scheme}://{host}:{args.openai_port}/v1", flush=True)

    started: list = []
    on_ready.started = started
    return on_ready


def resolve_admin_key(admin_key: str | None, restrict: bool) -> tuple[str | None, bool]:
    """(key, generated): the explicit key, else $CLIP_TRITON_ADMIN_KEY, else a random one; None if not restricting."""
    if not restrict:
        return None, False
    key = admin_key or os.environ.get(ADMIN_KEY_ENV)
    if key:
        return key, False
    return secrets.token_urlsafe(24), True


def serve(
    repository: str | Path,
    *,
    host: str = "127.0.0.1",
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    startup_timeout: float = 300.0,
    exit_timeout: int = 30,
    log_file: str | None = None,
    log_verbose: int = 0,
    stop_event: threading.Event | None = None,
    out=sys.stdout,
    restrict: bool = True,
    admin_key: str | None = None,
    supervise: bool = True,
    max_restarts: int = 5,
    restart_window: float = 300.0,
    check_interval: float = 1.0,
    on_ready=None,
) -> int:
    """Start, wait for every model, print the endpoints, supervise until a signal or `stop_event`; return an exit code.

    on_ready(server, supervisor_or_None) is called once the server first serves (tests use it to reach the server).
    """
    key, generated = resolve_admin_key(admin_key, restrict)
    server = TritonServer(
        repository,
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        log_path=log_file,
        log_verbose=log_verbose,
        startup_timeout=startup_timeout,
        exit_timeout=exit_timeout,
        die_with_parent=True,
        admin_key=key,
        extra_args=server_args(repository),
    )
    stop = stop_event or threading.Event()
    received: list[int] = []
    previous = _catch_signals(stop, received)
    try:
        started = _start(server, stop, received, log_file)
        if started is not None:
            return started
        _announce(server, Path(repository), key, generated, out)
        supervisor = None
        if supervise:
            supervisor = Supervisor(
                server,
                check_interval=check_interval,
                max_restarts=max_restarts,
                window=restart_window,
                ready_timeout=startup_timeout,
            )
        if on_ready is not None:
            on_ready(server, supervisor)
        failed = (
            supervisor.run(stop) != 0 if supervisor is not None else _watch_unsupervised(server, stop, check_interval)
        )
        if failed:
            return 1
        log.info(
            "signal %s: stopping tritonserver (in-flight requests finish first)", received[0] if received else "stop"
        )
        return 0
    finally:
        code = server.stop()
        log.info("tritonserver exit code %s", code)
        if code == 0 and not log_file:
            server.close()  # drop our temporary log; on failure it stays for the user to read
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _catch_signals(stop: threading.Event, received: list[int]) -> dict:
    """SIGINT/SIGTERM set `stop` (main thread only); returns the previous handlers to restore."""

    def on_signal(signum, _frame):
        received.append(signum)
        stop.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    return previous


def _start(server: TritonServer, stop: threading.Event, received: list[int], log_file: str | None) -> int | None:
    """Start the server and wait until every model is ready: None when it serves, else serve's exit code.

    Ports in use are refused at once (TritonServer.start names them): never "ready" on another server's port.
    """
    try:
        server.start()
        server.wait_ready(stop=stop)
    except StartupCancelled:
        log.info("signal %s while starting: stopping tritonserver", received[0] if received else "stop")
        return 0
    except TritonServerError as exc:
        log.error("%s", exc)
        if not log_file and server.process is not None:
            log.error("full server log: %s", server.log_path)
        return 1
    return None


def _announce(server: TritonServer, repository: Path, key: str | None, generated: bool, out) -> None:
    """Print the ready line, the endpoints and how the admin APIs are guarded."""
    try:
        model_id = json.loads((repository / "clip_triton.json").read_text())["model_id"]
    except (OSError, ValueError, KeyError, TypeError):  # a repository not built by us, or a damaged info file
        model_id = "?"
    print(
        f"tritonserver ready in {server.ready_seconds:.1f}s: {len(server.models)} models "
        f"({', '.join(server.models)}), model_id {model_id}",
        file=out,
    )
    print(f"  HTTP     http://{server.http_url}", file=out)
    print(f"  gRPC     {server.grpc_url}", file=out)
    print(f"  metrics  {server.metrics_url}", file=out)
    print(f"  log      {server.log_path}", file=out)
    if key is None:
        print("  admin APIs are NOT restricted (--no-restrict)", file=out)
    else:
        print(f"  restricted ({', '.join(RESTRICTED_APIS)}): send header {ADMIN_HEADER}", file=out)
        if generated:
            print(f"admin key: {key}", file=out)
    print("Ctrl-C to stop.", file=out, flush=True)


def _watch_unsupervised(server: TritonServer, stop: threading.Event, check_interval: float) -> bool:
    """--no-supervise: wait for `stop`; True (failed) as soon as the server exits or a model or stub is gone."""
    ticks = 0
    while not stop.wait(check_interval):
        ticks += 1
        if not server.running:
            log.error(
                "tritonserver exited unexpectedly (code %s):\n%s", server.process.returncode, server.log_text()[-4000:]
            )
            return True
        gone = server.not_ready_models() if ticks % 5 == 0 else []
        dead = server.dead_stubs()
        if gone or dead:  # a crashed python stub is not restarted and its model stays "ready" (2.51)
            log.error("models no longer ready: %s; dead python stubs: %s; stopping", gone, dead)
            return True
    return False


def run(args: argparse.Namespace, command: str) -> int:
    """Entry point of `clip-triton serve`."""
    if getattr(args, "log_format", "text") == "json":
        from .logs import use_json_logs

        use_json_logs()
    on_ready = start_openai(args, args.host)
    try:
        return serve(
            args.repository,
            host=args.host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            startup_timeout=args.startup_timeout,
            exit_timeout=args.exit_timeout,
            log_file=args.log_file,
            log_verbose=args.log_verbose,
            restrict=not args.no_restrict,
            admin_key=args.admin_key,
            supervise=not args.no_supervise,
            max_restarts=args.max_restarts,
            restart_window=args.restart_window,
            on_ready=on_ready,
        )
    except TritonServerError as exc:
        log.error("%s", exc)
        return 1
    except RuntimeError as exc:  # FrontEndError: bad OpenAI front end options, or its port in use
        log.error("%s", exc)
        return 1
    finally:
        for thread in getattr(on_ready, "started", []):
            thread.stop()
