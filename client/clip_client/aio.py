"""AsyncCLIPClient: the asyncio transport of the client core (_core.py), over tritonclient.http.aio /
tritonclient.grpc.aio. Every public method is a one-line run of the core's plan, the same plans CLIPClient runs."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np

from clip_common.endpoint import tritonclient_tls

from ._api import documented
from ._core import Blocking, Both, ClientBase, Configs, Infer, ModelInfo, Plan, Stream, log
from ._protocol import Request
from .errors import CLIPClientError, InvalidResponseError, ModelChangedError, ModelNotFoundError


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
    """What belongs to one event loop: the aio tritonclient and the concurrency semaphore."""

    loop: asyncio.AbstractEventLoop
    client: Any
    sem: asyncio.Semaphore


@documented
class AsyncCLIPClient(ClientBase):
    """Asyncio client with the same methods as CLIPClient (as coroutines). Use it from one event loop at a time.

    `timeout` is a total deadline per request to the server, retries included (see CLIPClient).

    >>> async with AsyncCLIPClient("http://127.0.0.1:8000") as c:
    ...     emb = await c.encode_text(["a cat", "a dog"])  # (2, D)
    """

    def __init__(self, url: str | None = None, protocol: str | None = None, **options: Any):
        super().__init__(url, protocol, **options)
        self._state: _LoopState | None = None
        self._closing: set[asyncio.Future] = set()  # closes of clients left behind by a loop change

    async def __aenter__(self) -> AsyncCLIPClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        state, self._state = self._state, None
        loop = asyncio.get_running_loop()
        pending = [f for f in self._closing if not f.done() and f.get_loop() is loop]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if state is not None:
            await state.client.close()

    def _loop_state(self) -> _LoopState:
        """The aio tritonclient and semaphore of the running event loop (created on first use; a new loop gets new
        ones, and the old client is closed in the background)."""
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
                # conn_timeout is aiohttp's total per request: past our own deadlines (wait_for) so that they decide
                session_timeout = max(self.timeout, self.connect_timeout) + 1.0
                client = mod.InferenceServerClient(
                    self.endpoint.address, conn_timeout=session_timeout, conn_limit=self.max_concurrency * 2, **tls
                )
            else:
                import tritonclient.grpc.aio as mod

                tls = tritonclient_tls(self.endpoint, self.ca_file)
                client = mod.InferenceServerClient(self.endpoint.address, **tls)
            self._state = _LoopState(loop, client, asyncio.Semaphore(self.max_concurrency))
        return self._state

    def _close_left_behind(self, state: _LoopState, loop: asyncio.AbstractEventLoop) -> None:
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

    # ---------------------------------------------------------------------------------- performing effects
    async def _run(self, plan: Plan) -> Any:
        """Drive a plan of the core: perform each effect it yields, send back the result (or throw the error)."""
        value: Any = None
        error: CLIPClientError | None = None
        while True:
            try:
                effect = plan.throw(error) if error is not None else plan.send(value)
            except StopIteration as stop:
                return stop.value
            value, error = None, None
            try:
                value = await self._perform(effect)
            except CLIPClientError as e:
                error = e

    async def _perform(self, effect: Any) -> Any:
        if isinstance(effect, Infer):
            return await self._request(effect.request)
        if isinstance(effect, Stream):
            return await self._stream(effect.batches, effect.make, effect.bar)
        if isinstance(effect, Configs):
            found = await _gather_or_cancel(*(self._model_config(m) for m in effect.models))
            return dict(zip(effect.models, found))
        if isinstance(effect, Both):
            return tuple(await _gather_or_cancel(self._run(effect.first), self._run(effect.second)))
        if isinstance(effect, Blocking):
            return await asyncio.to_thread(effect.fn)
        raise TypeError(f"unknown effect {effect!r}")

    async def _first_contact(self) -> None:
        """Once per client: is a Triton server there? If not, fail within connect_timeout with one clear message."""
        if self._reached:
            return
        started = time.monotonic()
        live = True
        try:
            client = self._loop_state().client
            if self.protocol == "grpc":
                live = await client.is_server_live(
                    headers=self.headers, client_timeout=self._first_contact_budget(started)
                )
            else:  # server metadata raises on any error status (a gateway's 429 included)
                await asyncio.wait_for(
                    client.get_server_metadata(headers=self.headers), self._first_contact_budget(started)
                )
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

    async def _call(self, what: str, model: str, send: Callable[[float], Awaitable[Any]]) -> Any:
        """await send(seconds left) with retries, all inside one deadline of `timeout` seconds; errors typed."""
        await self._first_contact()
        deadline = time.monotonic() + self.timeout
        for attempt in itertools.count():
            try:
                left = self._deadline_left(deadline, what)
                return await asyncio.wait_for(send(left), left)
            except asyncio.CancelledError:
                if _cancel_requested():
                    raise
                raise _closed_under(what) from None
            except Exception as exc:  # noqa: BLE001 - typed below
                err = self._mapped(exc, what, model)
                delay = self._retry_delay(err, attempt, deadline, what)
                if delay is None:
                    if isinstance(err, ModelChangedError):
                        await self._reread_info()
                    raise err from None
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _reread_info(self) -> None:
        """After a ModelChangedError: read the new model's info now (best effort; the next call retries)."""
        try:
            await self.get_model_info()
        except CLIPClientError as e:
            log.warning("re-reading the model info after a model change failed: %s", e)

    async def _request(self, request: Request) -> Any:
        """One inference request, sent and checked (Request.check); the checked value."""

        async def send(left: float) -> Any:
            state = self._loop_state()
            kwargs: dict[str, Any] = {"headers": self.headers, "timeout": int(left * 1_000_000)}
            if self.protocol == "grpc":
                kwargs["client_timeout"] = left
            async with state.sem:
                result = await state.client.infer(request.model, self._make_inputs(request.inputs), **kwargs)
            try:
                outputs = self._outputs(result)
            except Exception as e:  # noqa: BLE001 - a body tritonclient cannot parse
                raise InvalidResponseError(f"invalid answer from {self.url}: {request.model}: {e}") from None
            return self._answer(request, outputs)

        return await self._call(request.what, request.model, send)

    async def _model_config(self, model: str) -> dict | None:
        async def send(left: float) -> dict:
            client = self._loop_state().client
            if self.protocol == "grpc":
                raw = await client.get_model_config(model, as_json=True, client_timeout=left, headers=self.headers)
            else:
                raw = await client.get_model_config(model, headers=self.headers)
            return self._config_json(raw)

        try:
            return await self._call(f"config {model}", model, send)
        except ModelNotFoundError as e:  # the model is not served; anything else propagates
            log.debug("no config for %s: %s", model, e)
            return None
        except CLIPClientError as e:
            raise self._config_refused(model, e) from None

    async def _stream(self, batches: Iterator[list[bytes]], make: Callable[[list[bytes]], Request], bar) -> list[Any]:
        """Each batch's request, up to max_concurrency at once, reading batches (files, URLs) off the event loop
        only as slots free up; the answers in input order."""
        parts: dict[int, Any] = {}
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
                pending[asyncio.ensure_future(self._request(make(batch)))] = n
                if len(pending) >= self.max_concurrency:
                    await collect(asyncio.FIRST_COMPLETED)
            while pending:
                await collect(asyncio.FIRST_EXCEPTION)
        finally:  # on failure: stop what is still in flight
            await _cancel_all(pending)
        return [parts[n] for n in sorted(parts)]

    # ---------------------------------------------------------------------------------- public methods
    async def get_model_info(self) -> ModelInfo:
        return await self._run(self._p_info())

    @property
    def logit_scale(self) -> Awaitable[float]:
        return self._run(self._p_logit_scale())

    async def dimension(self) -> int:
        return await self._run(self._p_dimension())

    async def model_id(self) -> str:
        return await self._run(self._p_model_id())

    async def embed_texts(self, texts: str | Sequence[str]) -> np.ndarray:
        return await self._run(self._p_embed(texts, "text"))

    async def embed_images(self, images: Any) -> np.ndarray:
        return await self._run(self._p_embed(images, "image"))

    @overload
    async def encode_text(
        self, texts: str, normalize: bool = True, *, batch_size: int | None = None, show_progress: bool = False
    ) -> np.ndarray: ...  # (D,)

    @overload
    async def encode_text(
        self,
        texts: Iterable[str],
        normalize: bool = True,
        *,
        batch_size: int | None = None,
        show_progress: bool = False,
    ) -> np.ndarray: ...  # (N, D)

    async def encode_text(
        self,
        texts: str | Iterable[str],
        normalize: bool = True,
        *,
        batch_size: int | None = None,
        show_progress: bool = False,
    ) -> np.ndarray:
        return await self._run(self._p_encode(texts, "text", normalize, batch_size, show_progress))

    @overload
    async def encode_image(
        self,
        images: str | bytes | np.ndarray | Any,
        normalize: bool = True,
        *,
        batch_size: int | None = None,
        show_progress: bool = False,
    ) -> np.ndarray: ...  # (D,)

    @overload
    async def encode_image(
        self,
        images: Iterable[Any],
        normalize: bool = True,
        *,
        batch_size: int | None = None,
        show_progress: bool = False,
    ) -> np.ndarray: ...  # (N, D)

    async def encode_image(
        self, images: Any, normalize: bool = True, *, batch_size: int | None = None, show_progress: bool = False
    ) -> np.ndarray:
        return await self._run(self._p_encode(images, "image", normalize, batch_size, show_progress))

    async def compute_similarity(self, texts: Any, images: Any, apply_temperature: bool = True) -> np.ndarray:
        return await self._run(self._p_similarity(texts, images, apply_temperature))

    async def find_best_matches(
        self, texts: Any, images: Any, top_k: int = 5, return_scores: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        return await self._run(self._p_best(texts, images, top_k, return_scores, transpose=False))

    async def find_best_text_matches(
        self, images: Any, texts: Any, top_k: int = 5, return_scores: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        return await self._run(self._p_best(texts, images, top_k, return_scores, transpose=True))

    async def class_embeddings(self, class_texts: Any, templates: str | list[str] | None = None) -> np.ndarray:
        return await self._run(self._p_class_embeddings(class_texts, templates))

    async def classify(
        self, images: Any, labels: Any, templates: str | list[str] | None = None, top_k: int | None = None
    ) -> list[dict] | list[list[dict]]:
        return await self._run(self._p_classify(images, labels, templates, top_k))

    async def zero_shot_classification(
        self, images: Any, class_texts: Any, return_probabilities: bool = True, templates: list[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        return await self._run(self._p_zero_shot_classification(images, class_texts, return_probabilities, templates))

    async def zero_shot(self, images: Any, texts: Any, top_k: int = 5) -> dict[str, np.ndarray]:
        return await self._run(self._p_zero_shot(images, texts, top_k))
