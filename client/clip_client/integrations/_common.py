"""What the adapters share: the provider they wrap and image inputs as bytes."""

from __future__ import annotations

import io
from typing import Any

from ..providers import AsyncMultimodalEmbeddingProvider, MultimodalEmbeddingProvider


def sync_provider(
    provider: MultimodalEmbeddingProvider | None, url: str | None, protocol: str, options: dict[str, Any]
) -> MultimodalEmbeddingProvider:
    """The given provider, or a CLIPClient for url/protocol."""
    if provider is not None:
        if not isinstance(provider, MultimodalEmbeddingProvider):
            raise TypeError(f"provider must implement MultimodalEmbeddingProvider, got {type(provider).__name__}")
        return provider
    from ..client import CLIPClient

    return CLIPClient(url, protocol=protocol, **options)


def check_async(provider: AsyncMultimodalEmbeddingProvider | None) -> AsyncMultimodalEmbeddingProvider | None:
    """The async provider (e.g. an AsyncCLIPClient) or None."""
    if provider is not None and not isinstance(provider, AsyncMultimodalEmbeddingProvider):
        raise TypeError(
            f"async_provider must implement AsyncMultimodalEmbeddingProvider, got {type(provider).__name__}"
        )
    return provider


def image_input(item: Any) -> Any:
    """A file-like object (LlamaIndex passes BytesIO) -> its bytes; paths, bytes, PIL images, arrays as they are."""
    if isinstance(item, io.IOBase) or hasattr(item, "read"):
        return item.read()
    return item
