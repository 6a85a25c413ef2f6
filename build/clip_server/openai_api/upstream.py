"""The Triton servers behind the OpenAI front end: one pooled gRPC channel each, the served models, their limits."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from clip_common.contract import ClipInfo, EncodeImage, EncodeText

log = logging.getLogger(__name__)

TOKEN_COUNTS = EncodeText.TOKEN_COUNTS  # INT32 [N] per text; servers built before it lack it (usage 0 then)


DOWN_SECONDS = 5.0


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
    outputs: dict[str, set[str]] = field(default_factory=dict)  # ensemble -> its outputs (metadata, first use)
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
    return ServedModel(
        name=name,
        prefix=prefix,
        model_id=str(info["model_id"]),
        dim=int(info["projection_dim"]),
        max_text_items=int(info.get("max_text_items", per_request)),
        max_image_items=int(info.get("max_image_items", per_request)),
        max_text_bytes=int(limits.get("max_text_bytes", 16384)),
        max_image_bytes=int(limits.get("max_image_bytes", 20 * 1024 * 1024)),
        family=info.get("family"),
    )


@dataclass
class Endpoint:
    """One Triton address (a name resolving to N addresses gives N endpoints): its channel and its load."""

    address: str  # "IP:PORT" as tritonclient takes it ([IPv6]:PORT)
    client: InferenceServerClient
    origin: str = ""  # the --upstream it came from
    in_flight: int = 0
    down_until: float = 0.0  # after UNAVAILABLE it is tried last until then


class Upstreams:
    """A client (one gRPC channel) per Triton address, created once and kept; each call goes to the least busy one.

    Every --upstream HOST:PORT is resolved at start and again at each refresh (resolve()), one endpoint per address,
    like the gateway's STRICT_DNS clusters: a Kubernetes headless Service gives one channel per Triton pod, and pods
    that come and go are picked up (a single channel to such a name would stick to one pod)."""

    def __init__(self, urls: Sequence[str], timeout: float = 120.0):
        if not urls:
            raise ValueError("at least one --upstream is needed")
        self.urls = list(urls)
        self.timeout = timeout
        self.endpoints: dict[str, Endpoint] = {}
        self._turn = itertools.count()
        self._retired: list[asyncio.Task] = []
        self.catalog = Catalog()
        self.changed = asyncio.Event()  # set when an answer's model_id differs: discovery runs again at once

    async def start(self) -> None:
        """Resolve the upstreams and open their channels (inside the serving event loop)."""
        await self.resolve()

    async def resolve(self) -> None:
        """(Re-)resolve every upstream; open channels to new addresses, retire the ones gone (a name that does not
        resolve now keeps its old endpoints)."""
        found: dict[str, str] = {}  # address -> the upstream it came from
        for url in self.urls:
            addresses = await _addresses(url)
            if addresses is None:
                addresses = [a for a, e in self.endpoints.items() if e.origin == url]
            for address in addresses:
                found.setdefault(address, url)
        for address, url in found.items():
            if address not in self.endpoints:
                self.endpoints[address] = Endpoint(address, InferenceServerClient(address), origin=url)
                log.info("upstream %s: channel to %s", url, address)
        for address in [a for a in self.endpoints if a not in found]:
            gone = self.endpoints.pop(address)
            self._retired.append(asyncio.create_task(self._close_later(gone)))

    async def _close_later(self, endpoint: Endpoint) -> None:
        await asyncio.sleep(self.timeout)  # calls in flight on it finish first
        await endpoint.client.close()

    async def close(self) -> None:
        for task in self._retired:
            task.cancel()
        for endpoint in self.endpoints.values():
            await endpoint.client.close()

    def _order(self) -> list[Endpoint]:
        endpoints = list(self.endpoints.values())
        if not endpoints:
            return []
        start = next(self._turn) % len(endpoints)
        rotated = endpoints[start:] + endpoints[:start]
        now = time.monotonic()
        return sorted(rotated, key=lambda e: (e.down_until > now, e.in_flight))

    async def infer(self, model: str, inputs: list, outputs: list, request_id: str = "") -> Any:
        """One inference on the least busy upstream; UNAVAILABLE or a broken connection moves on to the next."""
        last: UpstreamError | None = None
        for endpoint in self._order():
            endpoint.in_flight += 1
            try:
                return await endpoint.client.infer(
                    model, inputs, outputs=outputs, request_id=request_id, client_timeout=self.timeout
                )
            except InferenceServerException as exc:
                last = UpstreamError(_status(exc), str(exc.message() or exc))
                if last.status != "UNAVAILABLE":
                    raise last from None
                endpoint.down_until = time.monotonic() + DOWN_SECONDS
                log.warning("upstream %s unavailable: %s", endpoint.address, last.message)
            finally:
                endpoint.in_flight -= 1
        raise last or UpstreamError("UNAVAILABLE", "no upstream address")

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
                model.outputs, model.created = old.outputs, old.created
            models[name] = model
        self.catalog = Catalog(models)
        return self.catalog

    async def _clip_info(self, prefix: str) -> dict:
        out = InferRequestedOutput(ClipInfo.INFO)
        result = await self.infer(prefix + ClipInfo.NAME, [], [out])
        raw = result.as_numpy(ClipInfo.INFO).reshape(-1)[0]
        return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)

    async def _outputs(self, model: ServedModel, ensemble: str) -> set[str]:
        """The outputs an ensemble of this model declares (servers built before token_counts/model_id lack them)."""
        if ensemble not in model.outputs:
            meta = await self._metadata(model.prefix + ensemble)
            model.outputs[ensemble] = {str(o.get("name")) for o in meta.get("outputs", [])}
        return model.outputs[ensemble]

    def _check_identity(self, model: ServedModel, result: Any, served: set[str]) -> None:
        """UpstreamError MODEL_CHANGED (and an immediate re-discovery) when the answer's model_id is not the one
        clip_info named: the server was rebuilt or a rolling update mixes versions; the caller retries."""
        if EncodeText.MODEL_ID not in served:
            return
        raw = result.as_numpy(EncodeText.MODEL_ID)
        answered = raw.reshape(-1)[0] if raw is not None and raw.size else b""
        answered = answered.decode("utf-8", "replace") if isinstance(answered, bytes) else str(answered)
        if answered != model.model_id:
            self.changed.set()
            raise UpstreamError(
                "MODEL_CHANGED", f"model {model.name} answered as {answered!r}, expected {model.model_id!r}"
            )

    async def _metadata(self, name: str) -> dict:
        for endpoint in self._order():
            try:
                return await endpoint.client.get_model_metadata(name, as_json=True, client_timeout=self.timeout)
            except InferenceServerException as exc:
                if _status(exc) != "UNAVAILABLE":
                    raise UpstreamError(_status(exc), str(exc.message() or exc)) from None
        raise UpstreamError("UNAVAILABLE", "no upstream answered")

    # ---------------------------------------------------------------------------------------- encoders
    async def encode_texts(
        self, model: ServedModel, texts: list[bytes], request_id: str
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(embeddings [N, D], token counts [N] or None when the server does not report them)."""
        arr = np.empty((len(texts), 1), dtype=object)
        arr[:, 0] = texts
        inp = InferInput(EncodeText.TEXT, [len(texts), 1], "BYTES")
        inp.set_data_from_numpy(arr)
        served = await self._outputs(model, EncodeText.NAME)
        counts = TOKEN_COUNTS in served
        wanted = [EncodeText.TEXT_EMBEDS, TOKEN_COUNTS, EncodeText.MODEL_ID]
        outputs = [InferRequestedOutput(name) for name in wanted if name in served or name == EncodeText.TEXT_EMBEDS]
        result = await self.infer(model.prefix + EncodeText.NAME, [inp], outputs, request_id)
        self._check_identity(model, result, served)
        embeds = _checked(result.as_numpy(EncodeText.TEXT_EMBEDS), len(texts), model.dim)
        tokens = result.as_numpy(TOKEN_COUNTS) if counts else None
        return embeds, (None if tokens is None else tokens.reshape(-1))

    async def encode_images(self, model: ServedModel, images: list[bytes], request_id: str) -> np.ndarray:
        arr = np.empty((len(images), 1), dtype=object)
        arr[:, 0] = images
        inp = InferInput(EncodeImage.IMAGE, [len(images), 1], "BYTES")
        inp.set_data_from_numpy(arr)
        served = await self._outputs(model, EncodeImage.NAME)
        outputs = [InferRequestedOutput(EncodeImage.IMAGE_EMBEDS)]
        if EncodeImage.MODEL_ID in served:
            outputs.append(InferRequestedOutput(EncodeImage.MODEL_ID))
        result = await self.infer(model.prefix + EncodeImage.NAME, [inp], outputs, request_id)
        self._check_identity(model, result, served)
        return _checked(result.as_numpy(EncodeImage.IMAGE_EMBEDS), len(images), model.dim)


async def _addresses(url: str) -> list[str] | None:
    """ "HOST:PORT" -> every "IP:PORT" it resolves to (an IP stays itself); None when it does not resolve now."""
    host, _, port = url.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        return [url]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        log.warning("cannot resolve upstream %s: %s", url, exc)
        return None
    return [f"[{i[4][0]}]:{port}" if ":" in i[4][0] else f"{i[4][0]}:{port}" for i in infos]


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
            await upstreams.resolve()
            await upstreams.discover()
            wait = 30.0
        except (UpstreamError, InferenceServerException, OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("cannot read clip_info from the upstreams yet: %s", exc)
            wait = interval
        upstreams.changed.clear()
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(upstreams.changed.wait())]
        await asyncio.wait(waits, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
