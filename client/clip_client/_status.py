"""Error mapping and retry policy, decided by the answer's status code alone (gRPC status, HTTP status), never by
the words of a message: Triton rewording a message cannot change what is retried.

| status (gRPC / HTTP)                         | error                    | retried                                   |
|----------------------------------------------|--------------------------|-------------------------------------------|
| UNAVAILABLE / 503, CANCELLED / 499           | ServerUnavailableError   | yes (queue full, stopping, restarting)    |
| no status: connection refused / reset        | ServerUnavailableError   | yes (once a server answered this client)  |
| - / 429                                      | RateLimitedError         | yes                                       |
| INTERNAL, UNKNOWN / 500                      | ServerError              | yes (a crashed stub, see below)           |
| NOT_FOUND / 404, a model never answered      | ModelNotFoundError       | no                                        |
| NOT_FOUND / 404, a model that answered       | ServerUnavailableError   | yes (it is unloading: a restart)          |
| INVALID_ARGUMENT, OUT_OF_RANGE, RESOURCE_EXHAUSTED / 400, 413 | InvalidInputError | no                     |
| DEADLINE_EXCEEDED / 408, 504; the deadline   | ServerTimeoutError       | no (the deadline is total)                |
| PERMISSION_DENIED, UNAUTHENTICATED / 401, 403| ServerError              | no                                        |
| anything else                                | ServerError              | no                                        |

A crashed or stopped Python stub answers INTERNAL ("not healthy") until a supervisor restarts the server, which can
take its inference probe's interval and more (Triton 24.x neither restarts the stub nor reports it in readiness), so
INTERNAL is retried like UNAVAILABLE: inference requests are idempotent. A server bug that answers INTERNAL every
time therefore costs the retry window (bounded by the request's deadline) before the ServerError.
"""

from __future__ import annotations

import http.client
import random

from clip_common.endpoint import DEFAULT_PORTS, Endpoint

from .errors import (
    CLIPClientError,
    InvalidInputError,
    ModelNotFoundError,
    RateLimitedError,
    ServerError,
    ServerTimeoutError,
    ServerUnavailableError,
)

UNAVAILABLE = {"StatusCode.UNAVAILABLE", "503", "StatusCode.CANCELLED", "499"}
RATE_LIMITED = {"429"}
INTERNAL = {"StatusCode.INTERNAL", "StatusCode.UNKNOWN", "500"}
NOT_FOUND = {"StatusCode.NOT_FOUND", "404"}
INVALID = {"StatusCode.INVALID_ARGUMENT", "StatusCode.OUT_OF_RANGE", "StatusCode.RESOURCE_EXHAUSTED", "400", "413"}
TIMEOUT = {"StatusCode.DEADLINE_EXCEEDED", "408", "504"}
DENIED = {"StatusCode.PERMISSION_DENIED", "StatusCode.UNAUTHENTICATED", "401", "403"}


def status_of(exc: BaseException) -> str:
    """The status a server answered with ("404", "StatusCode.NOT_FOUND"), "" when none (a transport failure).

    Only tritonclient's exceptions (and _http's) carry one, as a status() method; other libraries' `status`
    attributes (aiohttp's parser errors say 400 for a reply it could not parse) are not an answer's status.
    """
    status = getattr(exc, "status", None)
    if not callable(status):
        return ""
    try:
        return str(status() or "")
    except Exception:  # noqa: BLE001 - a foreign exception type with an odd status attribute
        return ""


def message_of(exc: BaseException) -> str:
    """The server's message (tritonclient's .message()), else str(exc)."""
    msg = getattr(exc, "message", None)
    try:
        text = msg() if callable(msg) else msg
    except Exception:  # noqa: BLE001 - a foreign exception type with an odd message attribute
        text = None
    return str(text or exc)


def map_error(exc: BaseException, what: str, url: str = "", known_model: bool = False) -> CLIPClientError:
    """Any exception of tritonclient or the transport -> one of our typed errors, chosen by its status alone.

    known_model: the called model answered this client before, so NOT_FOUND means it is being unloaded.
    """
    if isinstance(exc, CLIPClientError):
        if url and not exc.url:
            exc.url = url
        return exc
    status, msg = status_of(exc), message_of(exc)
    where = f" (server {url})" if url else ""
    tag = f"[{status}] " if status else ""
    if isinstance(exc, TimeoutError) or status in TIMEOUT:
        err: CLIPClientError = ServerTimeoutError(f"{what}: timed out{where}" + (f": {tag}{msg}" if msg else ""))
    elif status in RATE_LIMITED:
        err = RateLimitedError(f"{what}: rate limited{where}: {tag}{msg}")
    elif status in UNAVAILABLE or (status in NOT_FOUND and known_model):
        err = ServerUnavailableError(f"{what}: server unavailable{where}: {tag}{msg}")
    elif status in INVALID:
        err = InvalidInputError(msg)  # the server's words, verbatim: they name the item
    elif status in NOT_FOUND:
        err = ModelNotFoundError(f"{what}: not found{where}: {tag}{msg}")
    elif status:
        err = ServerError(f"{what}: {tag}{msg}{where}")
    elif is_connection_error(exc):
        err = ServerUnavailableError(f"{what}: cannot connect{where}: {msg}")
    else:
        err = ServerError(f"{what}: {type(exc).__name__}: {msg}{where}")
    err.status, err.url = status, url
    return err


def is_connection_error(exc: BaseException) -> bool:
    """A transport failure by its type: refused, reset, closed by the peer (no status: nothing was answered)."""
    if isinstance(
        exc,
        (
            ConnectionError,
            OSError,
            http.client.RemoteDisconnected,
            http.client.IncompleteRead,
            http.client.BadStatusLine,
        ),
    ):
        return True
    if isinstance(exc, http.client.HTTPException) and type(exc).__name__ == "HTTPConnectionClosed":
        return True  # geventhttpclient: the server closed the connection
    try:
        import aiohttp

        return isinstance(exc, aiohttp.ClientConnectionError)
    except ImportError:  # pragma: no cover - tritonclient[http] brings aiohttp
        return False


def retryable(err: CLIPClientError) -> bool:
    """Whether a request that failed with `err` may be sent again (the caller bounds the number and the time)."""
    if isinstance(err, (ServerUnavailableError, RateLimitedError)):
        return True
    return type(err) is ServerError and err.status in INTERNAL


def is_restricted(err: CLIPClientError) -> bool:
    """True when the server (or a gateway) refused an admin API: HTTP 401/403, gRPC PERMISSION_DENIED /
    UNAUTHENTICATED, or gRPC UNAVAILABLE from a live server (Triton's answer to a restricted API over gRPC)."""
    return err.status in DENIED or err.status == "StatusCode.UNAVAILABLE"


def backoff_delay(attempt: int, base: float, cap: float = 10.0) -> float:
    """Exponential backoff with half jitter for retry number `attempt` (0-based): uniform(0.5, 1) x
    min(cap, base * 2**attempt), so that retries spread out yet the schedule's length is predictable."""
    return random.uniform(0.5, 1.0) * min(cap, base * (2**attempt))


def unreachable_message(endpoint: Endpoint, reason: str) -> str:
    """One message for a server that was never reached: the address, the protocol, why, and what to check."""
    names = {"http": "HTTP", "grpc": "gRPC"}
    name = names[endpoint.protocol] + (" with TLS" if endpoint.tls else "")
    port = endpoint.effective_port
    hint = f"Is the server running, and is {port} its {names[endpoint.protocol]} port?"
    other = "grpc" if endpoint.protocol == "http" else "http"
    if port == DEFAULT_PORTS[other]:
        hint += (
            f" {port} is Triton's default {names[other]} port: use {other}://{endpoint.host}:{port}, or "
            f"{endpoint.protocol}://{endpoint.host}:{DEFAULT_PORTS[endpoint.protocol]} for "
            f"{names[endpoint.protocol]}."
        )
    else:
        hint += " (Triton's defaults: HTTP 8000, gRPC 8001.)"
    if endpoint.tls:
        hint += " Does it serve TLS there, with a certificate this client trusts (ca_file)?"
    return f"cannot reach a Triton server at {endpoint.url} ({name}): {reason.rstrip('. ')}. {hint}"
