"""AsyncCLIPClient: the asyncio twin of CLIPClient (tritonclient.http.aio / tritonclient.grpc.aio)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clip_common.contract import ZeroShot
from clip_common.endpoint import tritonclient_tls

from . import ops
from ._core import (
    DEFAULT_TEMPLATE,
    INFO_CONFIG_MODELS,
    ZERO_SHOT,
    CLIP_INFO,
    CLIP_INFO_OUT,
    ClientBase,
    ModelInfo,
    as_embeddings,
    backoff_delay,
    bytes_tensor,
    classify_result,
    log,
    map_error,
    model_info_from_clip_info,
    progress_bar,
    retryable,
)
from .errors import CLIPClientError, ModelNotFoundError, ServerError
from .inputs import encode_texts, iter_batches, normalize_texts


def _cancel_requested() -> bool:
    """Whether someone cancels the running task (else a CancelledError came from grpc.aio, which cancels the calls
    in flight when close() closes its channel). Before Python 3.11 this cannot be told: assume a real cancel."""
    cancelling = getattr(asyncio.current_task(), "cancelling", None)
    return cancelling is None or cancelling() > 0


def _closed_under(what: str) -> CLIPClientError:
    return CLIPClientError(f"{what}: cancelled: the client was closed while the call was in flight")


async def _cancel_all(tasks) -> None:
    """Cancel tasks and wait until each has finished, so that nothing is left running or unawaited."""
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _gather_or_cancel(*aws: Awaitable) -> list:
    """asyncio.gather, but when one fails the others are cancelled and awaited (gather leaves them running)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        await _cancel_all(tasks)
        raise


@dataclass
class _LoopState:
    """What belongs to one event loop: the aio tritonclient, the concurrency semaphore, the model-info lock."""

    loop: asyncio.AbstractEventLoop
    client: Any
    sem: asyncio.Semaphore
    info_lock: asyncio.Lock


class AsyncCLIPClient(ClientBase):
    """Asyncio client with the same methods as CLIPClient (as coroutines). Use it from one event loop.

    >>> async with AsyncCLIPClient("http://127.0.0.1:8000") as c:
    ...     emb = await c.encode_text(["a cat", "a dog"])  # (2, D)
    """

    def __init__(self, url: str | None = None, protocol: str | None = None, **options: Any):
        super().__init__(url, protocol, **options)
        self._state: _LoopState | None = None
        self._closing: set[asyncio.Future] = set()  # closes of clients left behind by a loop change

    async def __aenter__(self) -> "AsyncCLIPClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the underlying tritonclient (calls in flight keep their references and fail)."""
        state, self._state = self._state, None
        loop = asyncio.get_running_loop()
        pending = [f for f in self._closing if not f.done() and f.get_loop() is loop]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if state is not None:
            await state.client.close()

    def _loop_state(self) -> "_LoopState":
        """The aio tritonclient, semaphore and lock of the running event loop (created on first use; a new loop
        gets new ones, and the old client is closed in the background)."""
        loop = asyncio.get_running_loop()
        state = self._state
        if state is not None and state.loop is not loop:
            log.debug("event loop changed: opening a new tritonclient")
            self._state = None
            self._close_left_behind(state, loop)
        if self._state is None:
            if self.protocol == "http":
                import ssl

                import tritonclient.http.aio as mod

                tls = {}
                if self.endpoint.tls:  # the system's CA bundle unless ca_file
                    tls = {"ssl": True, "ssl_context": ssl.create_default_context(cafile=self.ca_file)}
                client = mod.InferenceServerClient(self.endpoint.address, conn_timeout=self.timeout,
                                                   conn_limit=self.max_concurrency * 2, **tls)
            else:
                import tritonclient.grpc.aio as mod

                client = mod.InferenceServerClient(self.endpoint.address, **tritonclient_tls(self.endpoint, self.ca_file))
            self._state = _LoopState(loop, client, asyncio.Semaphore(self.max_concurrency), asyncio.Lock())
        return self._state

    def _triton(self):
        """The aio tritonclient of the running event loop."""
        return self._loop_state().client

    def _close_left_behind(self, state: "_LoopState", loop: asyncio.AbstractEventLoop) -> None:
        """Best-effort close of a previous loop's client: on that loop while it still runs (another thread),
        else on this one (aiohttp and grpc.aio close cleanly there once their loop is gone)."""

        async def close() -> None:
            try:
                await asyncio.wait_for(state.client.close(), 5.0)
            except Exception as e:  # noqa: BLE001 - best effort: the old loop may be closed half-way
                log.debug("closing the previous event loop's tritonclient: %s", e)

        try:
            if state.loop.is_running() and not state.loop.is_closed():
                fut: asyncio.Future = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(close(), state.loop))
            else:
                fut = loop.create_task(close())
        except RuntimeError as e:  # the old loop stopped meanwhile
            log.debug("cannot close the previous event loop's tritonclient: %s", e)
            return
        self._closing.add(fut)
        fut.add_done_callback(self._closing.discard)

    # ---------------------------------------------------------------------------------- transport
    async def _first_contact(self) -> None:
        """Once per client: is a Triton server there? If not, fail within connect_timeout with one clear message."""
        if self._reached:
            return
        started = time.monotonic()
        live = True
        try:
            client = self._triton()
            if self.protocol == "grpc":
                live = await client.is_server_live(headers=self.headers,
                                                   client_timeout=self._first_contact_budget(started))
            else:  # server metadata raises on any error status (a gateway's 429 included)
                await asyncio.wait_for(client.get_server_metadata(headers=self.headers),
                                       self._first_contact_budget(started))
        except asyncio.CancelledError:
            if _cancel_requested():
                raise
            raise _closed_under("connect") from None
        except Exception as exc:  # noqa: BLE001 - a transport failure raises; an error answer means a server is there
            self._first_contact_failed(exc)
        else:
            if not live:
                self._first_contact_failed(None)
        self._reached = True

    async def _call(self, what: str, make_coro) -> Any:
        """make_coro() with retries on unavailable servers (once one was reached); errors mapped to our types."""
        await self._first_contact()
        for attempt in range(self.retries + 1):
            try:
                return await make_coro()
            except asyncio.CancelledError:
                if _cancel_requested():
                    raise
                raise _closed_under(what) from None
            except Exception as exc:  # noqa: BLE001 - mapped below
                err = map_error(exc, what)
                if not retryable(err) or attempt == self.retries:
                    raise err from None
                delay = backoff_delay(attempt, self.backoff)
                self._log_retry(what, err, attempt, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        async def once():
            state = self._loop_state()
            kwargs = self._infer_options()
            async with state.sem:  # wait_for: the client-side deadline, also for HTTP (aiohttp's is per session)
                result = await asyncio.wait_for(
                    state.client.infer(model, self._make_inputs(inputs), outputs=self._make_outputs(outputs), **kwargs),
                    self.timeout,
                )
            return {n: result.as_numpy(n) for n in outputs}

        return await self._call(f"infer {model}", once)

    async def _model_config(self, model: str) -> dict | None:
        async def once():
            client = self._triton()
            if self.protocol == "grpc":
                raw = await client.get_model_config(model, as_json=True, client_timeout=self.timeout, headers=self.headers)
            else:
                raw = await asyncio.wait_for(client.get_model_config(model, headers=self.headers), self.timeout)
            return self._config_json(raw)

        try:
            return await self._call(f"config {model}", once)
        except ModelNotFoundError as e:  # the model is not served; anything else propagates
            log.debug("no config for %s: %s", model, e)
            return None
        except ServerError as e:
            raise self._config_refused(model, e) from None

    # ---------------------------------------------------------------------------------- model info
    async def _clip_info(self) -> ModelInfo | None:
        """ModelInfo from the clip_info model; None when the server has none (older repositories)."""
        try:
            out = await self._infer(CLIP_INFO, {}, [CLIP_INFO_OUT])
            return model_info_from_clip_info(out[CLIP_INFO_OUT])
        except ModelNotFoundError as e:  # only an unknown model falls back to the model configs
            log.debug("no clip_info (%s); reading model configs", e)
            return None

    async def get_model_info(self) -> ModelInfo:
        """Embedding size, logit_scale, model identity and per-request limits, read from the server once.

        From the clip_info model (needs only the inference API); from the model configs when it is missing.
        """
        if self._info is not None:
            return self._info
        async with self._loop_state().info_lock:  # a local reference: close() may drop the state meanwhile
            if self._info is None:
                self._info = await self._clip_info()
            if self._info is None:
                found = await _gather_or_cancel(*(self._model_config(n) for n in INFO_CONFIG_MODELS))
                configs = dict(zip(INFO_CONFIG_MODELS, found))
                probe = self._scale_probe(configs)
                self._info = self._info_from_configs(configs, None if probe is None else await self._infer(*probe))
        return self._info

    # ---------------------------------------------------------------------------------- AsyncEmbeddingProvider
    async def dimension(self) -> int:
        """Embedding size (providers.AsyncEmbeddingProvider)."""
        return (await self.get_model_info()).dim

    async def model_id(self) -> str:
        """The served weights' identity (providers.AsyncEmbeddingProvider)."""
        return (await self.get_model_info()).model_id

    async def embed_texts(self, texts: str | Sequence[str]) -> np.ndarray:
        """Normalised text embeddings (n, D); one str is one text (providers.AsyncEmbeddingProvider)."""
        return np.atleast_2d(await self.encode_text(texts))  # one item ((D,)) -> (1, D)

    async def embed_images(self, images: Any) -> np.ndarray:
        """Normalised image embeddings (n, D); one path / bytes / image is one image (providers.AsyncMultimodalEmbeddingProvider)."""
        return np.atleast_2d(await self.encode_image(images))  # one item ((D,)) -> (1, D)

    # ---------------------------------------------------------------------------------- encoding
    async def _stream(self, batches: Iterator[list[bytes]], send: Callable[[list[bytes]], Awaitable[np.ndarray]],
                      bar) -> list[np.ndarray]:
        """send(batch) for each batch, up to max_concurrency at once, reading batches (files, URLs) off the event
        loop only as slots free up; the answers in input order."""
        parts: dict[int, np.ndarray] = {}
        pending: dict[asyncio.Task, int] = {}

        async def collect(when: str) -> None:
            done, _ = await asyncio.wait(pending, return_when=when)
            for task in done:
                parts[pending.pop(task)] = part = task.result()
                bar.update(len(part))

        try:
            for n in itertools.count():
                batch = await asyncio.to_thread(next, batches, None)
                if batch is None:
                    break
                pending[asyncio.ensure_future(send(batch))] = n
                if len(pending) >= self.max_concurrency:
                    await collect(asyncio.FIRST_COMPLETED)
            while pending:
                await collect(asyncio.FIRST_EXCEPTION)
        finally:  # on failure: stop what is still in flight
            await _cancel_all(pending)
        return [parts[n] for n in sorted(parts)]

    async def _encode(self, inputs: Any, kind: str, normalize: bool, batch_size: int | None,
                      show_progress: bool) -> np.ndarray:
        info = await self.get_model_info()
        model, name, out = self._route(kind)
        batches = iter_batches(self._item_bytes(inputs, kind), self._batch_limit(info, kind, batch_size),
                               self.max_request_bytes)

        async def send(batch: list[bytes]) -> np.ndarray:
            return (await self._infer(model, {name: bytes_tensor(batch)}, [out]))[out]

        with progress_bar(inputs, show_progress, kind) as bar:
            parts = await self._stream(batches, send, bar)
        return self._embeddings(parts, info.dim, normalize, inputs, kind)

    async def encode_text(self, texts: str | Iterable[str], normalize: bool = True, *, batch_size: int | None = None,
                          show_progress: bool = False) -> np.ndarray:
        """Text embeddings: (D,) for one str, (N, D) for an iterable (see CLIPClient.encode_text)."""
        return await self._encode(texts, "text", normalize, batch_size, show_progress)

    async def encode_image(self, images: Any, normalize: bool = True, *, batch_size: int | None = None,
                           show_progress: bool = False) -> np.ndarray:
        """Image embeddings: (D,) for one image, (N, D) for an iterable (see CLIPClient.encode_image)."""
        return await self._encode(images, "image", normalize, batch_size, show_progress)

    async def _text_matrix(self, texts: Any) -> np.ndarray:
        e = as_embeddings(texts)
        return await self.encode_text(texts) if e is None else e

    async def _image_matrix(self, images: Any) -> np.ndarray:
        e = as_embeddings(images)
        return await self.encode_image(images) if e is None else e

    # ---------------------------------------------------------------------------------- similarity
    async def compute_similarity(self, texts: Any, images: Any, apply_temperature: bool = True) -> np.ndarray:
        """(n_texts, n_images) cosine similarity, times exp(logit_scale) when apply_temperature; texts / images:
        embeddings or inputs to encode (see CLIPClient.compute_similarity)."""
        t, i = await _gather_or_cancel(self._text_matrix(texts), self._image_matrix(images))
        scale = (await self.get_model_info()).scale if apply_temperature else 1.0
        return ops.similarity(t, i, scale)

    async def find_best_matches(self, texts: Any, images: Any, top_k: int = 5, return_scores: bool = False):
        """Top-k image indices per text (n_texts, min(k, n_images)), best first; with return_scores, (indices, logits)."""
        return ops.ranked(await self.compute_similarity(texts, images), top_k, return_scores)

    async def find_best_text_matches(self, images: Any, texts: Any, top_k: int = 5, return_scores: bool = False):
        """Top-k text indices per image (n_images, min(k, n_texts)), best first; with return_scores, (indices, logits)."""
        return ops.ranked((await self.compute_similarity(texts, images)).T, top_k, return_scores)

    async def class_embeddings(self, class_texts: Any, templates: str | list[str] | None = None) -> np.ndarray:
        """Normalised class embeddings (C, D), prompt embeddings cached (see CLIPClient.class_embeddings)."""
        job = self._prompt_job(class_texts, templates)
        encoded = (await self.encode_text(job.missing, normalize=False)) if job.missing else None
        return self._class_matrix(job, encoded)

    async def classify(self, images: Any, labels: Any, templates: str | list[str] | None = None,
                       top_k: int | None = None):
        """Per image, [{"label", "score"}] sorted by score, default template "a photo of a {}." (see CLIPClient.classify)."""
        names = normalize_texts(labels)
        cls, img = await _gather_or_cancel(self.class_embeddings(names, templates or [DEFAULT_TEMPLATE]),
                                           self._image_matrix(images))
        return self._classified(images, img, cls, names, (await self.get_model_info()).scale, top_k)

    async def zero_shot_classification(
        self, images: Any, class_texts: Any, return_probabilities: bool = True, templates: list[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(predictions: class indices (n_images,) int64, probabilities (n_images, n_classes) or None)."""
        cls, img = await _gather_or_cancel(self.class_embeddings(class_texts, templates), self.encode_image(images))
        return classify_result(img, cls, (await self.get_model_info()).scale, return_probabilities)

    async def zero_shot(self, images: Any, texts: Any, top_k: int = 5) -> dict[str, np.ndarray]:
        """One raw call of the zero_shot ensemble (all its outputs); inputs must fit in one request."""
        t, i = list(encode_texts(texts)), await asyncio.to_thread(lambda: list(self._item_bytes(images, "image")))
        return await self._infer(
            ZERO_SHOT,
            {ZeroShot.TEXT: bytes_tensor(t), ZeroShot.IMAGE: bytes_tensor(i),
             ZeroShot.TOP_K: np.array([top_k], dtype=np.int32)},
            list(ZeroShot.OUTPUTS),
        )
