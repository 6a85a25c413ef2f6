"""Python client for CLIP-style dual encoders served on Triton: CLIPClient, AsyncCLIPClient, Parquet galleries."""

from __future__ import annotations

from ._core import DEFAULT_TEMPLATE, ModelInfo
from .aio import AsyncCLIPClient
from .client import CLIPClient
from .errors import (
    CLIPClientError,
    InvalidInputError,
    ModelMismatchError,
    ServerError,
    ServerTimeoutError,
    ServerUnavailableError,
)

__all__ = [
    "DEFAULT_TEMPLATE",
    "AsyncCLIPClient",
    "CLIPClient",
    "CLIPClientError",
    "InvalidInputError",
    "ModelInfo",
    "ModelMismatchError",
    "ServerError",
    "ServerTimeoutError",
    "ServerUnavailableError",
]
