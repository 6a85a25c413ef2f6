"""Typed errors for user input in the Triton Python models, and the one way they become responses (no torch)."""

from __future__ import annotations

import traceback


class InvalidInputError(ValueError):
    """A request item is invalid (bad UTF-8, undecodable image, wrong shape...); fails only its own request."""


def error_response(pb_utils, message: str, invalid_input: bool = True):
    """Failed response for one request: INVALID_ARG (HTTP 400) for the caller's input, else INTERNAL.

    `pb_utils` is the stub's triton_python_backend_utils (only importable inside Triton, so it is passed in).
    """
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if invalid_input else "INTERNAL", None)
    error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(error=error)


def internal_error(pb_utils, logger, what: str, exc: BaseException):
    """INTERNAL response for a fault of ours: the traceback goes to the server log, the client gets a short message
    (never a traceback, a file path or TorchScript source)."""
    if logger is not None:
        logger.log_error(f"{what}: {''.join(traceback.format_exception(exc))}")
    return error_response(pb_utils, f"{what} ({type(exc).__name__})", invalid_input=False)
