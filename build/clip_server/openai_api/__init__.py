"""`clip-triton openai`: an OpenAI-compatible embeddings API (POST /v1/embeddings, GET /v1/models, GET /health) in
front of Triton servers.

    clip-triton openai --upstream grpc://HOST:PORT [--upstream ...] --host H --port P [--api-key KEY]...
                       [--api-key-file FILE]

An ASGI app (Starlette on uvicorn) with one gRPC channel per upstream (tritonclient.grpc.aio, opened at startup),
calls balanced to the least busy upstream; models, dimensions and request limits come from the servers' clip_info.
Texts and images (Infinity's `modality: image`, NV-CLIP's data URIs mixed with texts, Jina's {"text"} / {"image"}
objects); image URLs only with --allow-url-fetch (SSRF-guarded: clip_server.openai_api.fetch). API keys from
--api-key, --api-key-file and $CLIP_TRITON_API_KEYS (comma-separated); none given: the API is open (a warning says
so). docs/deploy.md, "OpenAI-compatible API".
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Sequence

from ..api_keys import API_KEYS_ENV, APIKeyError, add_key_arguments, load_api_keys
from .app import FrontEndSettings, create_app
from .upstream import parse_upstream

log = logging.getLogger(__name__)

COMMAND_HELP = {"openai": "run the OpenAI-compatible /v1/embeddings front end in front of Triton servers"}


class FrontEndError(RuntimeError):
    """Bad front end options (keys file unreadable, bad upstream, ...)."""


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Options of `clip-triton openai`."""
    parser.add_argument(
        "--upstream",
        action="append",
        required=True,
        metavar="grpc://HOST:PORT",
        help="a Triton server's gRPC endpoint (repeatable: calls go to the least busy)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to expose)")
    parser.add_argument("--port", type=int, default=8080)
    add_key_arguments(parser)
    add_front_end_options(parser)


def add_front_end_options(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The front end's options; `serve --openai-port` shares them with the prefix `openai-`."""
    p = f"--{prefix}"
    parser.add_argument(f"{p}max-body-bytes", type=int, default=32 * 1024 * 1024, help="largest request body (413)")
    parser.add_argument(
        f"{p}max-inflight-bytes",
        type=int,
        default=256 * 1024 * 1024,
        help="request bytes (bodies and fetched images) held by all requests together (429 beyond)",
    )
    parser.add_argument(f"{p}allow-url-fetch", action="store_true", help="fetch http(s) image URLs given as input")
    parser.add_argument(
        f"{p}allow-private-urls",
        action="store_true",
        help="let image URLs reach loopback, private and link-local addresses (SSRF: off by default)",
    )
    parser.add_argument(
        f"{p}allow-url-network",
        action="append",
        default=[],
        metavar="CIDR",
        help="let image URLs reach this non-public network (repeatable), e.g. an internal image store",
    )
    parser.add_argument(f"{p}fetch-timeout", type=float, default=10.0, help="total seconds to fetch one image URL")
    parser.add_argument(f"{p}body-timeout", type=float, default=30.0, help="seconds to receive a request body (408)")
    parser.add_argument(f"{p}upstream-timeout", type=float, default=120.0, help="seconds Triton has to answer a call")
    parser.add_argument(f"{p}tls-cert", default=None, help="serve HTTPS with this certificate (PEM) ...")
    parser.add_argument(f"{p}tls-key", default=None, help="... and this private key (PEM)")
    parser.add_argument(f"{p}log-level", default="info", help="log level (one line per request, with its id)")


OPTIONS = (
    "max_body_bytes",
    "max_inflight_bytes",
    "allow_url_fetch",
    "allow_private_urls",
    "allow_url_network",
    "fetch_timeout",
    "body_timeout",
    "upstream_timeout",
    "tls_cert",
    "tls_key",
    "log_level",
)


def options_from_args(args: argparse.Namespace, prefix: str = "") -> dict:
    """The front end's options without the prefix."""
    return {k: getattr(args, prefix.replace("-", "_") + k) for k in OPTIONS}


def settings_from_args(args: argparse.Namespace, upstreams: Sequence[str], prefix: str = "") -> FrontEndSettings:
    """FrontEndSettings from the parsed options (keys from --api-key, --api-key-file and the environment)."""
    opt = options_from_args(args, prefix)
    if opt["max_body_bytes"] <= 0 or opt["max_inflight_bytes"] < opt["max_body_bytes"]:
        raise FrontEndError("--max-body-bytes must be > 0 and at most --max-inflight-bytes")
    return FrontEndSettings(
        upstreams=upstreams,
        api_keys=load_api_keys(args.api_key, args.api_key_file),
        max_body_bytes=opt["max_body_bytes"],
        max_inflight_bytes=opt["max_inflight_bytes"],
        allow_url_fetch=opt["allow_url_fetch"],
        allow_private_urls=opt["allow_private_urls"],
        url_networks=tuple(_networks(opt["allow_url_network"])),
        fetch_timeout=opt["fetch_timeout"],
        upstream_timeout=opt["upstream_timeout"],
        body_timeout=opt["body_timeout"],
    )


def _networks(values: Sequence[str]) -> list[str]:
    import ipaddress

    try:
        return [str(ipaddress.ip_network(v, strict=False)) for v in values]
    except ValueError as exc:
        raise FrontEndError(f"--allow-url-network: {exc}") from None


def uvicorn_server(
    settings: FrontEndSettings,
    host: str,
    port: int,
    *,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    log_level: str = "info",
):
    """A uvicorn.Server serving the front end (not started)."""
    import uvicorn

    if bool(tls_cert) != bool(tls_key):
        raise FrontEndError("--tls-cert and --tls-key go together")
    if not settings.api_keys:
        log.warning(
            "no API key given (--api-key, --api-key-file, $%s): /v1 is open to anyone who can reach %s:%s",
            API_KEYS_ENV,
            host,
            port,
        )
    logging.getLogger("clip_server.openai").setLevel(log_level.upper())
    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        proxy_headers=False,  # the client address is not used (Envoy in front keeps its own)
        access_log=False,
        log_level="warning",
        ssl_certfile=tls_cert,
        ssl_keyfile=tls_key,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=10,
    )
    return uvicorn.Server(config)


class FrontEndThread:
    """The front end in a background thread (for `clip-triton serve --openai-port`)."""

    def __init__(self, server):
        self.server = server
        self.thread = threading.Thread(target=server.run, name="openai-front-end", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        self.thread.start()
        for _ in range(int(timeout / 0.05)):
            if self.server.started or not self.thread.is_alive():
                break
            threading.Event().wait(0.05)
        if not self.server.started:
            raise FrontEndError("the OpenAI front end did not start (port in use?)")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def run(args: argparse.Namespace, command: str) -> int:
    """Entry point of `clip-triton openai`."""
    try:
        upstreams = [parse_upstream(u) for u in args.upstream]
        settings = settings_from_args(args, upstreams)
        server = uvicorn_server(
            settings, args.host, args.port, tls_cert=args.tls_cert, tls_key=args.tls_key, log_level=args.log_level
        )
    except (FrontEndError, APIKeyError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    scheme = "https" if args.tls_cert else "http"
    print(f"OpenAI-compatible API on {scheme}://{args.host}:{args.port}/v1 -> {', '.join(upstreams)}", flush=True)
    server.run()
    return 0 if server.started else 1


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m clip_server.openai_api`: the same command without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="clip-triton openai", description=COMMAND_HELP["openai"])
    add_arguments(parser, "openai")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(parser.parse_args(argv), "openai")


if __name__ == "__main__":
    sys.exit(main())
