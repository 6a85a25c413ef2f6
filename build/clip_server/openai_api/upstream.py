"""The Triton servers behind the OpenAI front end: one pooled gRPC channel each, the served models, their limits."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence
from urllib.parse import urlsplit

import numpy as np
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from clip_common.contract import ClipInfo, EncodeImage, EncodeText

log = logging.getLogger(__name__)

TOKEN_COUNTS = EncodeText.TOKEN_COUNTS  # INT32 [N] per text; servers built before it lack it (usage 0 then)


class UpstreamError(RuntimeError):
    """Triton refused or failed a call: `status` is the gRPC status name, `message` Triton's text."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class ServedModel:
    """One model of the repository: public name, Triton name prefix, identity and limits."""

    name: str
    prefix: str
    model_id: str
    dim: int
    max_text_items: int
    max_image_items: int
    max_text_bytes: int
    max_image_bytes: int
    family: str | None = None
    has_token_counts: bool | None = None  # learnt from encode_text's metadata on first use
    created: int = 0


@dataclass
class Catalog:
    """The served models by public name (in the order clip_info lists them)."""

    models: dict[str, ServedModel] = field(default_factory=dict)


def parse_upstream(text: str) -> str:
    """grpc://HOST:PORT (or HOST:PORT) -> "HOST:PORT" as tritonclient takes it."""
    url = text if "://" in text else f"grpc://{text}"
    parts = urlsplit(url)
    if parts.scheme != "grpc" or not parts.hostname or parts.port is None or parts.path not in ("", "/"):
        raise ValueError(f"--upstream {text!r}: expected grpc://HOST:PORT")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{parts.port}"


def _status(exc: InferenceServerException) -> str:
    status = str(exc.status() or "")
    return status.removeprefix("StatusCode.") or "UNKNOWN"


def model_from_info(info: dict, name: str, prefix: str) -> ServedModel:
    """A ServedModel from one model's clip_info JSON."""
    limits = info.get("limits", {})
    per_request = int(info.get("max_items_per_request", 64))
    return ServedModel(name=name, prefix=prefix, model_id=str(info["model_id"]), dim=int(info["projection_dim"]),
                       max_text_items=int(info.get("max_text_items", per_request)),
                       max_image_items=int(info.get("max_image_items", per_request)),
                       max_text_bytes=int(limits.get("max_text_bytes", 16384)),
                       max_image_bytes=int(limits.get("max_image_bytes", 20 * 1024 * 1024)),
                       family=info.get("family"))


class Upstreams:
    """A client (one gRPC channel) per Triton server, created once; calls go to the least busy one."""

    def __init__(self, urls: Sequence[str], timeout: float = 60.0):
        if not urls:
            raise ValueError("at least one --upstream is needed")
        self.urls = list(urls)
        self.timeout = timeout
        self.clients: list[InferenceServerClient] = []
        self.in_flight: list[int] = []
        self._turn = itertools.count()
        self.catalog = Catalog()

    async def start(self) -> None:
        """Open the channels (inside the serving event loop)."""
        self.clients = [InferenceServerClient(url) for url in self.urls]
        self.in_flight = [0] * len(self.clients)

    async def close(self) -> None:
        for client in self.clients:
            await client.close()

    def _order(self) -> list[int]:
        start = next(self._turn)
        n = len(self.clients)
        rotated = [(start + i) % n for i in range(n)]
        return sorted(rotated, key=lambda i: self.in_flight[i])

    async def infer(self, model: str, inputs: list, outputs: list, request_id: str = "") -> Any:
        """One inference on the least busy upstream; UNAVAILABLE or a broken connection moves on to the next."""
        last: UpstreamError | None = None
        for i in self._order():
            self.in_flight[i] += 1
            try:
                return await self.clients[i].infer(model, inputs, outputs=outputs, request_id=request_id,
                                                   client_timeout=self.timeout)
            except InferenceServerException as exc:
                last = UpstreamError(_status(exc), str(exc.message() or exc))
                if last.status != "UNAVAILABLE":
                    raise last from None
                log.warning("upstream %s unavailable: %s", self.urls[i], last.message)
            finally:
                self.in_flight[i] -= 1
        raise last or UpstreamError("UNAVAILABLE", "no upstream")

    # ---------------------------------------------------------------------------------------- discovery
    async def discover(self) -> Catalog:
        """Read the unprefixed clip_info (and each further model's own) into the catalog."""
        top = await self._clip_info("")
        entries = top.get("models") or [{"name": top.get("name") or "clip", "prefix": ""}]
        models: dict[str, ServedModel] = {}
        for entry in entries:
            prefix = str(entry.get("prefix", ""))
            info = top if prefix == "" else await self._clip_info(prefix)
            name = str(entry.get("name") or info.get("name") or "clip")
            old = self.catalog.models.get(name)
            model = model_from_info(info, name, prefix)
            if old is not None and old.model_id == model.model_id:
                model.has_token_counts, model.created = old.has_token_counts, old.created
            models[name] = model
        self.catalog = Catalog(models)
        return self.catalog

    async def _clip_info(self, prefix: str) -> dict:
        out = InferRequestedOutput(ClipInfo.INFO)
        result = await self.infer(prefix + ClipInfo.NAME, [], [out])
        raw = result.as_numpy(ClipInfo.INFO).reshape(-1)[0]
        return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)

    async def _token_counts_served(self, model: ServedModel) -> bool:
        if model.has_token_counts is None:
            name = model.prefix + EncodeText.NAME
            meta = await self._metadata(name)
            model.has_token_counts = any(o.get("name") == TOKEN_COUNTS for o in meta.get("outputs", []))
        return model.has_token_counts

    async def _metadata(self, name: str) -> dict:
        for i in self._order():
            try:
                return await self.clients[i].get_model_metadata(name, as_json=True, client_timeout=self.timeout)
            except InferenceServerException as exc:
                if _status(exc) != "UNAVAILABLE":
                    raise UpstreamError(_status(exc), str(exc.message() or exc)) from None
        raise UpstreamError("UNAVAILABLE", "no upstream answered")

    # ---------------------------------------------------------------------------------------- encoders
    async def encode_texts(self, model: ServedModel, texts: list[bytes],
                           request_id: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(embeddings [N, D], token counts [N] or None when the server does not report them)."""
        arr = np.empty((len(texts), 1), dtype=object)
        arr[:, 0] = texts
        inp = InferInput(EncodeText.TEXT, [len(texts), 1], "BYTES")
        inp.set_data_from_numpy(arr)
        counts = await self._token_counts_served(model)
        outputs = [InferRequestedOutput(EncodeText.TEXT_EMBEDS)]
        if counts:
            outputs.append(InferRequestedOutput(TOKEN_COUNTS))
        result = await self.infer(model.prefix + EncodeText.NAME, [inp], outputs, request_id)
        embeds = _checked(result.as_numpy(EncodeText.TEXT_EMBEDS), len(texts), model.dim)
        tokens = result.as_numpy(TOKEN_COUNTS) if counts else None
        return embeds, (None if tokens is None else tokens.reshape(-1))

    async def encode_images(self, model: ServedModel, images: list[bytes], request_id: str) -> np.ndarray:
        arr = np.empty((len(images), 1), dtype=object)
        arr[:, 0] = images
        inp = InferInput(EncodeImage.IMAGE, [len(images), 1], "BYTES")
        inp.set_data_from_numpy(arr)
        result = await self.infer(model.prefix + EncodeImage.NAME, [inp],
                                  [InferRequestedOutput(EncodeImage.IMAGE_EMBEDS)], request_id)
        return _checked(result.as_numpy(EncodeImage.IMAGE_EMBEDS), len(images), model.dim)


def _checked(embeds: np.ndarray | None, rows: int, dim: int) -> np.ndarray:
    """The server's answer, or UpstreamError when it has the wrong shape or non-finite values."""
    if embeds is None or embeds.shape != (rows, dim):
        shape = None if embeds is None else embeds.shape
        raise UpstreamError("INTERNAL", f"the server answered embeddings of shape {shape}, expected ({rows}, {dim})")
    if not np.isfinite(embeds).all():
        raise UpstreamError("INTERNAL", "the server answered non-finite embeddings")
    return embeds


async def discover_until_ready(upstreams: Upstreams, stop: asyncio.Event, interval: float = 1.0) -> None:
    """Retry discovery until it succeeds (the front end answers 503 until then), then refresh every 30 s."""
    wait = interval
    while not stop.is_set():
        try:
            await upstreams.discover()
            wait = 30.0
        except (UpstreamError, InferenceServerException, OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("cannot read clip_info from the upstreams yet: %s", exc)
            wait = interval
        try:
            await asyncio.wait_for(stop.wait(), wait)
        except TimeoutError:
            pass
