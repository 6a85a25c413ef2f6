"""Typed exceptions raised by clip_client; every one derives from CLIPClientError."""

from __future__ import annotations


class CLIPClientError(Exception):
    """Base class of every error clip_client raises; `status` is the server's answer (e.g. "404",
    "StatusCode.NOT_FOUND") when there was one, else ""; `url` the server it came from, when known."""

    status: str = ""
    url: str = ""


class InvalidInputError(CLIPClientError, ValueError):
    """The input was rejected, by the client's own checks or by the server (message kept verbatim)."""


class ServerUnavailableError(CLIPClientError, ConnectionError):
    """The server could not be reached (or was not ready) after all retries."""


class RateLimitedError(CLIPClientError):
    """A gateway in front of the server (or the server) refused the request for rate limiting (HTTP 429), still
    after the retries with backoff."""


class ServerTimeoutError(CLIPClientError, TimeoutError):
    """The server did not answer within the client's timeout (a total deadline per request, retries included)."""


class ServerError(CLIPClientError):
    """The server failed a request for another reason (its message is kept verbatim)."""


class ModelNotFoundError(ServerError):
    """The server does not serve the model that was called (HTTP 404 / gRPC NOT_FOUND), or `model=` names none of
    the repository's models."""


class InvalidResponseError(ServerError):
    """The server (or something between it and the client) answered something that breaks the contract: an output
    missing, a wrong number of rows, a wrong embedding size, values that are not finite."""


class ModelChangedError(CLIPClientError):
    """The server answered with another model than the one this client had read (its model_id changed, e.g. a
    restart with other weights); the client dropped its cached prompts and model info: call again."""


class ModelMismatchError(CLIPClientError):
    """Embeddings from one model were about to be compared with embeddings from another."""
