"""LangChain: CLIPEmbeddings, a langchain_core `Embeddings` backed by a clip-triton server (extra `langchain`).

from clip_client.integrations.langchain import CLIPEmbeddings
emb = CLIPEmbeddings(url="127.0.0.1:8001")          # or CLIPEmbeddings(provider=any MultimodalEmbeddingProvider)
emb.embed_documents(["a cat", "a dog"]); emb.embed_query("a cat"); emb.embed_image(["cat.jpg"])
"""

from __future__ import annotations

from typing import Any

from ..gallery.base import require
from ._common import check_async, image_input, sync_provider

Embeddings = require("langchain_core.embeddings", "langchain", "CLIPEmbeddings").Embeddings


class CLIPEmbeddings(Embeddings):
    """Texts (and images, for LangChain's multimodal vector stores) embedded by a CLIP model on Triton."""

    def __init__(
        self,
        provider: Any = None,
        *,
        url: str | None = None,
        protocol: str = "grpc",
        async_provider: Any = None,
        **client_options: Any,
    ):
        self.provider = sync_provider(provider, url, protocol, client_options)
        self.async_provider = check_async(async_provider)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """One normalised vector per text."""
        return self.provider.embed_texts(list(texts)).tolist() if texts else []

    def embed_query(self, text: str) -> list[float]:
        """The normalised vector of one query text."""
        return self.provider.embed_texts([text])[0].tolist()

    def embed_image(self, uris: list[Any]) -> list[list[float]]:
        """One normalised vector per image (paths, bytes, PIL images): the hook LangChain's multimodal stores call."""
        return self.provider.embed_images([image_input(u) for u in uris]).tolist() if uris else []

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        """embed_documents on the async provider when there is one (else in a thread, LangChain's default)."""
        if self.async_provider is None:
            return await super().aembed_documents(texts)
        return (await self.async_provider.embed_texts(list(texts))).tolist() if texts else []

    async def aembed_query(self, text: str) -> list[float]:
        """embed_query on the async provider when there is one."""
        if self.async_provider is None:
            return await super().aembed_query(text)
        return (await self.async_provider.embed_texts([text]))[0].tolist()
