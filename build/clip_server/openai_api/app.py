"""The ASGI app of the OpenAI front end: POST /v1/embeddings, GET /v1/models, GET /health."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import time
import uuid
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from .fetch import FetchError, FetchPolicy, ImageFetcher
from .schema import APIError, EmbeddingRequest, Item, invalid, parse_request, response_body
from .upstream import ServedModel, UpstreamError, Upstreams, discover_until_ready

log = logging.getLogger("clip_server.openai")

REQUEST_ID = "x-request-id"
FETCH_CONCURRENCY = 8  # image URLs of one request fetched at once
UPSTREAM_CONCURRENCY = 4  # chunks of one request in flight to Triton at once (as CLIPClient's max_concurrency)
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
# gRPC status of a Triton answer -> (HTTP status, what the caller is told: None = Triton's own message)
_UPSTREAM_STATUS = {
    "INVALID_ARGUMENT": (400, None),
    "OUT_OF_RANGE": (400, None),
    "UNAVAILABLE": (503, "the model server is overloaded or unavailable: retry later"),
    "RESOURCE_EXHAUSTED": (429, "the model server's queue is full: retry later"),
    "DEADLINE_EXCEEDED": (503, "the model server did not answer in time: retry later"),
    "NOT_FOUND": (503, "the model is not loaded on the model server"),
    "MODEL_CHANGED": (503, "the served model changed on the model server: retry"),
}


@dataclass
class FrontEndSettings:
    """Options of the front end (see `clip-triton openai --help`)."""

    upstreams: Sequence[str]
    api_keys: Sequence[str] = ()
    max_body_bytes: int = 32 * 1024 * 1024
    max_inflight_bytes: int = 256 * 1024 * 1024
    allow_url_fetch: bool = False
    allow_private_urls: bool = False
    url_networks: tuple[str, ...] = ()
    fetch_timeout: float = 10.0
    upstream_timeout: float = 120.0
    body_timeout: float = 30.0
    normalize: bool = True


@dataclass
class _Budget:
    """Request bytes held in memory by all requests together (bounded by max_inflight_bytes)."""

    limit: int
    used: int = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True


@dataclass
class _State:
    settings: FrontEndSettings
    upstreams: Upstreams
    key_digests: list[bytes]
    budget: _Budget
    fetcher: ImageFetcher | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    started: int = field(default_factory=lambda: int(time.time()))


def json_response(body: Any, status: int = 200, request_id: str = "") -> Response:
    headers = {REQUEST_ID: request_id} if request_id else None
    return Response(
        orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def error_response(err: APIError, request_id: str) -> Response:
    resp = json_response(err.body(), err.status, request_id)
    if err.status == 401:
        resp.headers["www-authenticate"] = "Bearer"
    return resp


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def key_ok(header: str | None, digests: Sequence[bytes]) -> bool:
    """Whether an Authorization header carries one of the keys (constant time over every key)."""
    if not digests:
        return True
    scheme, _, token = (header or "").partition(" ")
    given = _digest(token.strip() if scheme.lower() == "bearer" else "\0no key\0")
    found = False
    for digest in digests:  # no early exit: the time does not depend on which key matched
        found |= hmac.compare_digest(given, digest)
    return found


# ---------------------------------------------------------------------------------------------- request id + log
class RequestIdMiddleware:
    """Pure ASGI: every HTTP answer carries x-request-id (the caller's when well-formed, else a new one), and one log
    line per request names it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        request_id = incoming if _REQUEST_ID_OK.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = [0]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": headers + [(b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:  # never a traceback to the caller; the log has it, with the request id
            log.exception("request %s failed", request_id)
            if status[0] == 0:
                body = orjson.dumps(APIError(500, f"internal error (request id {request_id})").body())
                await send_with_id(
                    {"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"application/json")]}
                )
                await send({"type": "http.response.body", "body": body})
                status[0] = 500
        finally:
            log.info(
                "%s %s %s %.1fms request_id=%s",
                scope.get("method"),
                str(scope.get("path", "")).encode("unicode_escape").decode("ascii")[:200],  # no line breaks in logs
                status[0],
                (time.perf_counter() - started) * 1000,
                request_id,
            )


def _request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "")


# ---------------------------------------------------------------------------------------------- handlers
async def health(request: Request) -> Response:
    state: _State = request.app.state.front
    if not state.upstreams.catalog.models:
        return json_response(APIError(503, "not ready: no model server answered yet").body(), 503, _request_id(request))
    return json_response({"status": "ok"}, 200, _request_id(request))  # model names only with a key (/v1/models)


async def live(request: Request) -> Response:
    """Liveness: the process answers (whether or not a Triton server does; /health says that)."""
    return json_response({"status": "alive"}, 200, _request_id(request))


def _auth(request: Request, state: _State) -> None:
    if not key_ok(request.headers.get("authorization"), state.key_digests):
        raise APIError(
            401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key"
        )


def _catalog(state: _State) -> dict[str, ServedModel]:
    models = state.upstreams.catalog.models
    if not models:
        raise APIError(503, "not ready: no model server answered yet; retry later")
    return models


def _model_object(state: _State, model: ServedModel) -> dict:
    return {"id": model.name, "object": "model", "created": state.started, "owned_by": "clip-triton"}


async def list_models(request: Request) -> Response:
    state: _State = request.app.state.front
    rid = _request_id(request)
    try:
        _auth(request, state)
        data = [_model_object(state, m) for m in _catalog(state).values()]
    except APIError as err:
        return error_response(err, rid)
    return json_response({"object": "list", "data": data}, 200, rid)


async def get_model(request: Request) -> Response:
    state: _State = request.app.state.front
    rid = _request_id(request)
    try:
        _auth(request, state)
        name = request.path_params["model"]
        model = _catalog(state).get(name)
        if model is None:
            raise APIError(404, f"The model {name[:100]!r} does not exist", param="model", code="model_not_found")
    except APIError as err:
        return error_response(err, rid)
    return json_response(_model_object(state, model), 200, rid)


async def embeddings(request: Request) -> Response:
    state: _State = request.app.state.front
    rid = _request_id(request)
    held = [0]
    try:
        _auth(request, state)
        body, held[0] = await _read_body(request, state)
        models = _catalog(state)
        largest = max(m.max_image_bytes for m in models.values())
        req = parse_request(_json(body), largest)
        del body
        model = models.get(req.model) or next((m for m in models.values() if m.model_id == req.model), None)
        if model is None:
            raise APIError(
                404,
                f"The model {req.model[:100]!r} does not exist: served are {', '.join(models)}",
                param="model",
                code="model_not_found",
            )
        if req.dimensions is not None and req.dimensions != model.dim:
            raise invalid(
                f"'dimensions' is not supported: {model.name} returns {model.dim}-dimensional embeddings "
                "(CLIP embeddings cannot be shortened); omit 'dimensions'",
                param="dimensions",
                code="dimensions_not_supported",
            )
        embeds, tokens = await _embed(state, model, req, rid, held)
        if state.settings.normalize:
            norms = np.linalg.norm(embeds, axis=1, keepdims=True)
            embeds = embeds / np.where(norms > 0, norms, 1.0)
        return json_response(response_body(model.name, embeds, req.encoding_format, tokens), 200, rid)
    except APIError as err:
        if err.status >= 500:
            log.warning("request %s: %s", rid, err.message)
        return error_response(err, rid)
    finally:
        state.budget.used -= held[0]


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise invalid("the request body is not valid JSON", param=None) from None


async def _read_body(request: Request, state: _State) -> tuple[bytes, int]:
    """The whole body within the cap and the in-flight budget: (body, bytes taken from the budget)."""
    cap = state.settings.max_body_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > cap:
        raise APIError(413, f"request body of {length} bytes is larger than the limit of {cap} bytes")
    parts, held = [], 0
    try:
        async with asyncio.timeout(state.settings.body_timeout):  # a trickled body cannot hold the budget for long
            async for chunk in request.stream():
                if held + len(chunk) > cap:
                    raise APIError(413, f"request body larger than the limit of {cap} bytes")
                if not state.budget.take(len(chunk)):
                    raise APIError(
                        429, "too many request bytes in flight on this server: retry later", code="server_busy"
                    )
                held += len(chunk)
                parts.append(chunk)
    except TimeoutError:
        state.budget.used -= held
        raise APIError(408, f"request body not received within {state.settings.body_timeout:g} s") from None
    except ClientDisconnect:  # the caller hung up mid-body: its bytes go back to the budget (else they leak: 429s)
        state.budget.used -= held
        raise APIError(400, "the request body was cut off (the client disconnected)") from None
    except BaseException:
        state.budget.used -= held
        raise
    return b"".join(parts), held


async def _embed(
    state: _State, model: ServedModel, req: EmbeddingRequest, rid: str, held: list[int]
) -> tuple[np.ndarray, int]:
    """Embeddings in input order (texts and images sent in concurrent chunks) and the texts' token total."""
    texts = [(i, it) for i, it in enumerate(req.items) if it.kind == "text"]
    images = [(i, it) for i, it in enumerate(req.items) if it.kind != "text"]
    for i, it in texts:
        if len(it.data) > model.max_text_bytes:
            raise invalid(
                f"input[{i}]: the text is {len(it.data)} bytes, more than the limit of {model.max_text_bytes}",
                param=f"input[{i}]",
            )
    if images:
        await _fetch_urls(state, images, model, held)
    gate = asyncio.Semaphore(UPSTREAM_CONCURRENCY)  # a 2048-input request must not flood Triton's queue at once

    async def gated(make, what: str):
        async with gate:
            return await _call(make(), what)

    jobs = []
    for start in range(0, len(texts), model.max_text_items):
        chunk = [it.data for _, it in texts[start : start + model.max_text_items]]
        jobs.append(gated(lambda c=chunk: state.upstreams.encode_texts(model, c, rid), "texts"))
    for start in range(0, len(images), model.max_image_items):
        chunk = [it.data for _, it in images[start : start + model.max_image_items]]
        rows = [i for i, _ in images[start : start + model.max_image_items]]
        jobs.append(_named(gated(lambda c=chunk: state.upstreams.encode_images(model, c, rid), "images"), rows))
    answers = await asyncio.gather(*jobs)
    out = np.empty((len(req.items), model.dim), dtype=np.float32)
    tokens, k = 0, 0
    for start in range(0, len(texts), model.max_text_items):
        embeds, counts = answers[k]
        k += 1
        rows = [i for i, _ in texts[start : start + model.max_text_items]]
        out[rows] = embeds
        tokens += int(counts.sum()) if counts is not None else 0
    for start in range(0, len(images), model.max_image_items):
        rows = [i for i, _ in images[start : start + model.max_image_items]]
        out[rows] = answers[k]
        k += 1
    return out, tokens


async def _fetch_urls(state: _State, images: list[tuple[int, Item]], model: ServedModel, held: list[int]) -> None:
    """Fetch the image URLs in place (bytes taken from the in-flight budget are added to held[0])."""
    urls = [(i, it) for i, it in images if it.kind == "url"]
    if not urls:
        return
    if state.fetcher is None:
        i = urls[0][0]
        raise invalid(
            f"input[{i}]: image URLs are not fetched by this server (started without --allow-url-fetch): "
            "send the image as a data:image/...;base64, URI",
            param=f"input[{i}]",
            code="url_fetch_disabled",
        )

    if len(urls) > model.max_image_items:
        raise invalid(f"{len(urls)} image URLs in one request; at most {model.max_image_items}")
    gate = asyncio.Semaphore(FETCH_CONCURRENCY)

    async def one(i: int, it: Item) -> int:
        async with gate:
            try:
                data = await state.fetcher.fetch(str(it.data), model.max_image_bytes)
            except FetchError as exc:
                raise invalid(f"input[{i}]: {exc}", param=f"input[{i}]", code="image_url_refused") from None
        if not data:
            raise invalid(f"input[{i}]: the image URL answered an empty body", param=f"input[{i}]")
        if not state.budget.take(len(data)):
            raise APIError(429, "too many request bytes in flight on this server: retry later", code="server_busy")
        it.kind, it.data = "image", data
        return len(data)

    results = await asyncio.gather(*(one(i, it) for i, it in urls), return_exceptions=True)
    held[0] += sum(r for r in results if isinstance(r, int))
    for r in results:
        if isinstance(r, BaseException):
            raise r


_IMAGE_REFUSED = re.compile(r"^the model server refused the images: image (\d+): ")


async def _named(coro, rows: list[int]):
    """A refused image named by its index in `input` (Triton numbers the images of its chunk from 0)."""
    try:
        return await coro
    except APIError as err:
        found = _IMAGE_REFUSED.match(err.message) if err.status == 400 else None
        if found is None or int(found.group(1)) >= len(rows):
            raise
        param = f"input[{rows[int(found.group(1))]}]"
        raise invalid(f"{param}: {err.message[found.end() :]}", param=param, code=err.code) from None


async def _call(coro, what: str):
    try:
        return await coro
    except UpstreamError as exc:
        status, message = _UPSTREAM_STATUS.get(exc.status, (500, None))
        if status == 400:
            raise invalid(f"the model server refused the {what}: {_clean(exc.message)}", code="invalid_input") from None
        log.warning("upstream %s: %s", exc.status, exc.message)
        raise APIError(status, message or "the model server failed this request") from None


def _clean(message: str) -> str:
    """Triton's message for a refused input, without the ensemble wrapper's prefixes or anything path-like."""
    text = re.sub(r"(?:in ensemble '[^']*', )+", "", message)
    text = re.sub(r"(?:/[\w.-]+){2,}", "<path>", text)
    return text.strip()[:500]


# ---------------------------------------------------------------------------------------------- app
def create_app(settings: FrontEndSettings) -> Starlette:
    """The ASGI app; the gRPC channels, the URL fetcher and discovery start with it (lifespan)."""
    keys = [k for k in settings.api_keys if k]
    upstreams = Upstreams(settings.upstreams, timeout=settings.upstream_timeout)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        state = _State(settings, upstreams, [_digest(k) for k in keys], _Budget(settings.max_inflight_bytes))
        await upstreams.start()
        if settings.allow_url_fetch:
            policy = FetchPolicy(
                allow_private=settings.allow_private_urls,
                deadline=settings.fetch_timeout,
                max_bytes=max(1, settings.max_body_bytes),
                networks=tuple(settings.url_networks),
            )
            state.fetcher = ImageFetcher(policy)
        app.state.front = state
        task = asyncio.create_task(discover_until_ready(upstreams, state.stop))
        try:
            yield
        finally:
            state.stop.set()
            await task
            if state.fetcher is not None:
                await state.fetcher.aclose()
            await upstreams.close()

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        message = "method not allowed" if status == 405 else f"no route {request.url.path}"
        return json_response(APIError(status, message, param=None).body(), status, _request_id(request))

    routes = [
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/health/live", live, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found})
    app.add_middleware(RequestIdMiddleware)
    return app
