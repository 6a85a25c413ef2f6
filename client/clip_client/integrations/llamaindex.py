"""LlamaIndex: CLIPMultiModalEmbedding, a llama_index `MultiModalEmbedding` backed by a clip-triton server
(extra `llamaindex`); plugs into MultiModalVectorStoreIndex(image_embed_model=..., embed_model=...).

    from clip_client.integrations.llamaindex import CLIPMultiModalEmbedding
    emb = CLIPMultiModalEmbedding(url="127.0.0.1:8001")
    emb.get_text_embedding("a cat"); emb.get_image_embedding("cat.jpg")
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..gallery.base import require
from ._common import check_async, image_input, sync_provider

_base = require("llama_index.core.embeddings", "llamaindex", "CLIPMultiModalEmbedding")
PrivateAttr = require("llama_index.core.bridge.pydantic", "llamaindex", "CLIPMultiModalEmbedding").PrivateAttr


class CLIPMultiModalEmbedding(_base.MultiModalEmbedding):
    """Text and image embeddings of a CLIP model on Triton, in one space."""

    _provider: Any = PrivateAttr()
    _async_provider: Any = PrivateAttr()

    def __init__(
        self,
        provider: Any = None,
        *,
        url: str | None = None,
        protocol: str = "grpc",
        async_provider: Any = None,
        model_name: str = "clip-triton",
        embed_batch_size: int = 64,
        **client_options: Any,
    ):
        super().__init__(model_name=model_name, embed_batch_size=embed_batch_size)
        self._provider = sync_provider(provider, url, protocol, client_options)
        self._async_provider = check_async(async_provider)

    @classmethod
    def class_name(cls) -> str:
        return "CLIPMultiModalEmbedding"

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._provider.embed_texts([query])[0].tolist()

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._provider.embed_texts([text])[0].tolist()

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._provider.embed_texts(list(texts)).tolist()

    def _get_image_embedding(self, img_file_path: Any) -> list[float]:
        return self._provider.embed_images([image_input(img_file_path)])[0].tolist()

    def _get_image_embeddings(self, img_file_paths: list[Any]) -> list[list[float]]:
        return self._provider.embed_images([image_input(p) for p in img_file_paths]).tolist()

    async def _aget_query_embedding(self, query: str) -> list[float]:
        if self._async_provider is None:
            return await asyncio.to_thread(self._get_query_embedding, query)
        return (await self._async_provider.embed_texts([query]))[0].tolist()

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return await self._aget_query_embedding(text)

    async def _aget_image_embedding(self, img_file_path: Any) -> list[float]:
        if self._async_provider is None:
            return await asyncio.to_thread(self._get_image_embedding, img_file_path)
        return (await self._async_provider.embed_images([image_input(img_file_path)]))[0].tolist()
