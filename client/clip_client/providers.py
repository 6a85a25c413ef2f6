"""The EmbeddingProvider protocols: what CLIPClient / AsyncCLIPClient offer to code that only needs embeddings.

A single str (or one image: a path, bytes, a PIL image) is one item, as in encode_text / encode_image, and gives
(1, dimension()). Anything with these methods plugs into the gallery and the LangChain / LlamaIndex adapters
(clip_client.integrations). Embeddings are float32 arrays (n, dimension()), L2-normalised; model_id() names the
model (the same weights give the same id), so that vectors of different models are never mixed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class EmbeddingProvider(Protocol):
    """Embeds texts."""

    def dimension(self) -> int:
        """Embedding size."""

    def model_id(self) -> str:
        """Identity of the model (content hash of its weights for clip-triton servers)."""

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dimension()) float32, L2-normalised."""


@runtime_checkable
class MultimodalEmbeddingProvider(EmbeddingProvider, Protocol):
    """Embeds texts and images into one space."""

    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        """(len(images), dimension()) float32, L2-normalised; images: paths, bytes, PIL images, uint8 arrays."""


@runtime_checkable
class AsyncEmbeddingProvider(Protocol):
    """The asyncio twin of EmbeddingProvider (every method a coroutine)."""

    async def dimension(self) -> int:
        """Embedding size."""

    async def model_id(self) -> str:
        """Identity of the model."""

    async def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dimension) float32, L2-normalised."""


@runtime_checkable
class AsyncMultimodalEmbeddingProvider(AsyncEmbeddingProvider, Protocol):
    """The asyncio twin of MultimodalEmbeddingProvider."""

    async def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        """(len(images), dimension) float32, L2-normalised."""
