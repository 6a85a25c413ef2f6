"""Python client for CLIP-style dual encoders served on Triton: CLIPClient, AsyncCLIPClient, galleries
(clip_client.gallery)."""

from __future__ import annotations

from ._core import DEFAULT_TEMPLATE, ModelInfo
from .aio import AsyncCLIPClient
from .client import CLIPClient
from .errors import (
    CLIPClientError,
    InvalidInputError,
    InvalidResponseError,
    ModelChangedError,
    ModelMismatchError,
    ModelNotFoundError,
    RateLimitedError,
    ServerError,
    ServerTimeoutError,
    ServerUnavailableError,
)
from .providers import (
    AsyncEmbeddingProvider,
    AsyncMultimodalEmbeddingProvider,
    EmbeddingProvider,
    MultimodalEmbeddingProvider,
)

__all__ = [
    "DEFAULT_TEMPLATE",
    "AsyncCLIPClient",
    "AsyncEmbeddingProvider",
    "AsyncMultimodalEmbeddingProvider",
    "CLIPClient",
    "CLIPClientError",
    "EmbeddingProvider",
    "InvalidInputError",
    "InvalidResponseError",
    "ModelChangedError",
    "ModelInfo",
    "ModelMismatchError",
    "ModelNotFoundError",
    "MultimodalEmbeddingProvider",
    "RateLimitedError",
    "ServerError",
    "ServerTimeoutError",
    "ServerUnavailableError",
]
