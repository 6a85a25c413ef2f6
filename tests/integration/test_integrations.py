"""EmbeddingProvider protocols and the LangChain / LlamaIndex adapters, on their real base classes, against the
real Triton server."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from clip_client import (
    AsyncCLIPClient,
    AsyncMultimodalEmbeddingProvider,
    CLIPClient,
    EmbeddingProvider,
    MultimodalEmbeddingProvider,
)

TEXTS = ["a photo of a cat", "a red car", ""]


@pytest.fixture()
def image(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path)
    return path


def test_clients_are_providers(triton_server, image):
    with CLIPClient(triton_server.grpc_url) as c:
        assert isinstance(c, EmbeddingProvider) and isinstance(c, MultimodalEmbeddingProvider)
        info = c.get_model_info()
        assert (c.dimension(), c.model_id()) == (info.dim, info.model_id)
        assert np.allclose(c.embed_texts(TEXTS), c.encode_text(TEXTS)) and c.embed_texts(TEXTS).shape == (3, info.dim)
        ref = c.encode_image([str(image)])
        # one str / one path is one item, as in encode_text / encode_image (not split into characters)
        one_text, one_image = c.embed_texts(TEXTS[0]), c.embed_images(str(image))
        assert one_text.shape == (1, info.dim) and np.allclose(one_text[0], c.encode_text(TEXTS[0]), atol=1e-6)
        assert one_image.shape == (1, info.dim) and np.allclose(one_image, ref, atol=1e-6)

    async def run():
        async with AsyncCLIPClient(triton_server.http_url, protocol="http") as a:
            assert isinstance(a, AsyncMultimodalEmbeddingProvider)
            return (
                await a.dimension(),
                await a.model_id(),
                await a.embed_images([str(image)]),
                await a.embed_images(image),
                await a.embed_texts(TEXTS[0]),
            )

    dim, model_id, emb, one_image, one_text = asyncio.run(run())
    assert (dim, model_id) == (info.dim, info.model_id) and np.allclose(emb, ref, atol=1e-6)
    assert np.allclose(one_image, ref, atol=1e-6) and one_text.shape == (1, info.dim)


def test_langchain_embeddings(triton_server, image):
    from langchain_core.embeddings import Embeddings

    from clip_client.integrations.langchain import CLIPEmbeddings

    emb = CLIPEmbeddings(url=triton_server.grpc_url)
    assert isinstance(emb, Embeddings)
    with CLIPClient(triton_server.grpc_url) as c:
        ref_t, ref_i = c.encode_text(TEXTS), c.encode_image([str(image)])
    docs = emb.embed_documents(TEXTS)
    assert isinstance(docs, list) and isinstance(docs[0], list) and isinstance(docs[0][0], float)
    assert np.allclose(docs, ref_t, atol=1e-6) and np.allclose(emb.embed_query(TEXTS[1]), ref_t[1], atol=1e-6)
    assert np.allclose(emb.embed_image([str(image)]), ref_i, atol=1e-6) and emb.embed_documents([]) == []

    async def run(e):
        return await e.aembed_documents(TEXTS[:2]), await e.aembed_query(TEXTS[0])

    for e in (emb, CLIPEmbeddings(url=triton_server.grpc_url, async_provider=AsyncCLIPClient(triton_server.grpc_url))):
        docs, query = asyncio.run(run(e))
        assert np.allclose(docs, ref_t[:2], atol=1e-6) and np.allclose(query, ref_t[0], atol=1e-6)
    with pytest.raises(TypeError):
        CLIPEmbeddings(provider=object())


def test_llamaindex_multimodal_embedding(triton_server, image):
    from llama_index.core.embeddings import MultiModalEmbedding

    from clip_client.integrations.llamaindex import CLIPMultiModalEmbedding

    emb = CLIPMultiModalEmbedding(url=triton_server.grpc_url, embed_batch_size=2)
    assert isinstance(emb, MultiModalEmbedding)
    with CLIPClient(triton_server.grpc_url) as c:
        ref_t, ref_i = c.encode_text(TEXTS), c.encode_image([str(image)])
    assert np.allclose(emb.get_text_embedding(TEXTS[0]), ref_t[0], atol=1e-6)
    assert np.allclose(emb.get_query_embedding(TEXTS[1]), ref_t[1], atol=1e-6)
    assert np.allclose(emb.get_text_embedding_batch(TEXTS), ref_t, atol=1e-6)  # batches of 2 through the base class
    assert np.allclose(emb.get_image_embedding(str(image)), ref_i[0], atol=1e-6)
    buf = io.BytesIO(image.read_bytes())  # LlamaIndex also passes images as BytesIO
    assert np.allclose(emb.get_image_embedding_batch([str(image), buf]), np.vstack([ref_i, ref_i]), atol=1e-6)

    async def run(e):
        return await e.aget_query_embedding(TEXTS[0]), await e.aget_image_embedding(str(image))

    for e in (
        emb,
        CLIPMultiModalEmbedding(url=triton_server.grpc_url, async_provider=AsyncCLIPClient(triton_server.grpc_url)),
    ):
        q, i = asyncio.run(run(e))
        assert np.allclose(q, ref_t[0], atol=1e-6) and np.allclose(i, ref_i[0], atol=1e-6)
