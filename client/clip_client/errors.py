"""Typed exceptions raised by clip_client; every one derives from CLIPClientError."""

from __future__ import annotations


class CLIPClientError(Exception):
    """Base class of every error clip_client raises."""


class InvalidInputError(CLIPClientError, ValueError):
    """The input was rejected, by the client's own checks or by the server (message kept verbatim)."""


class ServerUnavailableError(CLIPClientError, ConnectionError):
    """The server could not be reached (or was not ready) after all retries."""


class ServerTimeoutError(CLIPClientError, TimeoutError):
    """The server did not answer within the client's timeout."""


class ServerError(CLIPClientError):
    """The server failed a request for another reason (its message is kept verbatim)."""


class ModelMismatchError(CLIPClientError):
    """Embeddings from one model were about to be compared with embeddings from another."""
