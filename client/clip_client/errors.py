"""Typed exceptions raised by clip_client; every one derives from CLIPClientError."""

from __future__ import annotations


class CLIPClientError(Exception):
    """Base class of every error clip_client raises; `status` is the server's answer (e.g. "404",
    "StatusCode.NOT_FOUND") when there was one, else ""."""

    status: str = ""


class InvalidInputError(CLIPClientError, ValueError):
    """The input was rejected, by the client's own checks or by the server (message kept verbatim)."""


class ServerUnavailableError(CLIPClientError, ConnectionError):
    """The server could not be reached (or was not ready) after all retries."""


class RateLimitedError(CLIPClientError):
    """A gateway in front of the server (or the server) refused the request for rate limiting (HTTP 429, or a gRPC
    status saying so), still after the retries with backoff."""


class ServerTimeoutError(CLIPClientError, TimeoutError):
    """The server did not answer within the client's timeout."""


class ServerError(CLIPClientError):
    """The server failed a request for another reason (its message is kept verbatim)."""


class ModelNotFoundError(ServerError):
    """The server does not serve the model that was called (HTTP 404 / gRPC NOT_FOUND, "unknown model")."""


class ModelMismatchError(CLIPClientError):
    """Embeddings from one model were about to be compared with embeddings from another."""
