"""CLIPClient: the synchronous transport of the client core (_core.py): blocking calls, a thread pool for
concurrent batches. Every public method is a one-line run of the core's plan."""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, overload
from urllib.parse import quote

import numpy as np

from clip_common.endpoint import tritonclient_tls

from ._api import documented
from ._core import Blocking, Both, ClientBase, Configs, Infer, ModelInfo, Plan, Stream, log
from ._protocol import Request
from .errors import CLIPClientError, InvalidResponseError, ModelChangedError, ModelNotFoundError


@documented
class CLIPClient(ClientBase):
    """Synchronous client. Thread-safe: every thread gets its own connection.

    `timeout` is a total deadline per request to the server (connecting, sending, waiting, reading, and the
    retries with their backoff); a call that sends several batches gives each batch that deadline.

    >>> with CLIPClient("grpc://127.0.0.1:8001") as c:  # http://, https://, grpc://, grpcs://
    ...     c.classify("cat.jpg", ["cat", "dog"])  # [{"label": "cat", "score": 0.98}, {"label": "dog", ...}]
    """

    def __init__(self, url: str | None = None, protocol: str | None = None, **options: Any):
        super().__init__(url, protocol, **options)
        self._local = threading.local()
        self._clients: list[Any] = []
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._http = None
        if self.protocol == "http":
            from ._http import HttpTransport

            self._http = HttpTransport(self.endpoint, self.ca_file, self.connect_timeout)

    # ---------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> CLIPClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            clients, self._clients = self._clients, []
        if pool is not None:
            pool.shutdown(wait=True)
        for c in clients:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        if self._http is not None:
            self._http.close()
        self._local = threading.local()

    def _triton(self):
        """This thread's gRPC tritonclient (created on first use)."""
        client = getattr(self._local, "client", None)
        if client is None:
            import tritonclient.grpc as mod

            client = mod.InferenceServerClient(self.endpoint.address, **tritonclient_tls(self.endpoint, self.ca_file))
            with self._lock:
                self._clients.append(client)
            self._local.client = client
        return client

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="clip-client")
            return self._pool

    # ---------------------------------------------------------------------------------- performing effects
    def _run(self, plan: Plan) -> Any:
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
                value = self._perform(effect)
            except CLIPClientError as e:
                error = e

    def _perform(self, effect: Any) -> Any:
        if isinstance(effect, Infer):
            return self._request(effect.request)
        if isinstance(effect, Stream):
            return self._stream(effect.batches, effect.make, effect.bar)
        if isinstance(effect, Configs):
            return {m: self._model_config(m) for m in effect.models}
        if isinstance(effect, Both):
            return self._run(effect.first), self._run(effect.second)
        if isinstance(effect, Blocking):
            return effect.fn()
        raise TypeError(f"unknown effect {effect!r}")

    def _first_contact(self) -> None:
        """Once per client: is a Triton server there? If not, fail within connect_timeout with one clear message."""
        if self._reached:
            return
        started = time.monotonic()
        live = True
        try:
            if self.protocol == "grpc":
                live = self._triton().is_server_live(
                    headers=self.headers, client_timeout=self._first_contact_budget(started)
                )
            else:  # server metadata: any error status means a server (or a gateway) is there
                self._http.get_json("/v2", self._first_contact_budget(started), self.headers)
        except Exception as exc:  # noqa: BLE001 - a transport failure raises; an error answer means a server is there
            self._first_contact_failed(exc)
        else:
            if not live:
                self._first_contact_failed(None)
        self._reached = True

    def _call(self, what: str, model: str, send: Callable[[float], Any]) -> Any:
        """send(seconds left) with retries, all inside one deadline of `timeout` seconds; errors typed."""
        self._first_contact()
        deadline = time.monotonic() + self.timeout
        for attempt in itertools.count():
            try:
                return send(self._deadline_left(deadline, what))
            except Exception as exc:  # noqa: BLE001 - typed below
                err = self._mapped(exc, what, model)
                delay = self._retry_delay(err, attempt, deadline, what)
                if delay is None:
                    if isinstance(err, ModelChangedError):
                        self._reread_info()
                    raise err from None
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _reread_info(self) -> None:
        """After a ModelChangedError: read the new model's info now (best effort; the next call retries)."""
        try:
            self.get_model_info()
        except CLIPClientError as e:
            log.warning("re-reading the model info after a model change failed: %s", e)

    def _request(self, request: Request) -> Any:
        """One inference request, sent and checked (Request.check); the checked value."""

        def send(left: float) -> Any:
            inputs = self._make_inputs(request.inputs)
            queue_us = int(left * 1_000_000)  # the server's queue policy drops it once we have given up
            if self._http is not None:
                result = self._http.infer(request.model, inputs, left, self.headers, queue_us)
            else:
                result = self._triton().infer(
                    request.model, inputs, client_timeout=left, headers=self.headers, timeout=queue_us
                )
            try:
                outputs = self._outputs(result)
            except Exception as e:  # noqa: BLE001 - a body tritonclient cannot parse
                raise InvalidResponseError(f"invalid answer from {self.url}: {request.model}: {e}") from None
            return self._answer(request, outputs)

        return self._call(request.what, request.model, send)

    def _model_config(self, model: str) -> dict | None:
        """A model's config JSON; None when the model is not served."""

        def send(left: float) -> dict:
            if self._http is not None:
                return self._http.get_json(f"/v2/models/{quote(model)}/config", left, self.headers)
            return self._config_json(
                self._triton().get_model_config(model, as_json=True, client_timeout=left, headers=self.headers)
            )

        try:
            return self._call(f"config {model}", model, send)
        except ModelNotFoundError as e:  # the model is not served; anything else propagates
            log.debug("no config for %s: %s", model, e)
            return None
        except CLIPClientError as e:
            raise self._config_refused(model, e) from None

    def _stream(self, batches: Iterator[list[bytes]], make: Callable[[list[bytes]], Request], bar) -> list[Any]:
        """Each batch's request, up to max_concurrency at once, reading batches only as slots free up; the answers
        in input order. A lone batch is sent from the calling thread."""
        first = next(batches, None)
        second = None if first is None else next(batches, None)
        if second is None:
            parts = [] if first is None else [self._request(make(first))]
            bar.update(sum(len(p) for p in parts))
            return parts
        pending: deque[Future] = deque()
        parts = []

        def collect() -> None:
            part = pending.popleft().result()
            parts.append(part)
            bar.update(len(part))

        try:
            for batch in itertools.chain((first, second), batches):
                pending.append(self._executor().submit(self._request, make(batch)))
                while len(pending) >= self.max_concurrency:
                    collect()
            while pending:
                collect()
        finally:
            for f in pending:
                f.cancel()
        return parts

    # ---------------------------------------------------------------------------------- public methods
    def get_model_info(self) -> ModelInfo:
        return self._run(self._p_info())

    @property
    def logit_scale(self) -> float:
        return self._run(self._p_logit_scale())

    def dimension(self) -> int:
        return self._run(self._p_dimension())

    def model_id(self) -> str:
        return self._run(self._p_model_id())

    def embed_texts(self, texts: str | Sequence[str]) -> np.ndarray:
        return self._run(self._p_embed(texts, "text"))

    def embed_images(self, images: Any) -> np.ndarray:
        return self._run(self._p_embed(images, "image"))

    @overload
    def encode_text(
        self, texts: str, normalize: bool = True, *, batch_size: int | None = None, show_progress: bool = False
    ) -> np.ndarray: ...  # (D,)

    @overload
    def encode_text(
        self,
        texts: Iterable[str],
        normalize: bool = True,
        *,
        batch_size: int | None = None,
        show_progress: bool = False,
    ) -> np.ndarray: ...  # (N, D)

    def encode_text(
        self,
        texts: str | Iterable[str],
        normalize: bool = True,
        *,
        batch_size: int | None = None,
        show_progress: bool = False,
    ) -> np.ndarray:
        return self._run(self._p_encode(texts, "text", normalize, batch_size, show_progress))

    @overload
    def encode_image(
        self,
        images: str | bytes | np.ndarray | Any,
        normalize: bool = True,
        *,
        batch_size: int | None = None,
        show_progress: bool = False,
    ) -> np.ndarray: ...  # (D,)

    @overload
    def encode_image(
        self,
        images: Iterable[Any],
        normalize: bool = True,
        *,
        batch_size: int | None = None,
        show_progress: bool = False,
    ) -> np.ndarray: ...  # (N, D)

    def encode_image(
        self, images: Any, normalize: bool = True, *, batch_size: int | None = None, show_progress: bool = False
    ) -> np.ndarray:
        return self._run(self._p_encode(images, "image", normalize, batch_size, show_progress))

    def compute_similarity(self, texts: Any, images: Any, apply_temperature: bool = True) -> np.ndarray:
        return self._run(self._p_similarity(texts, images, apply_temperature))

    def find_best_matches(
        self, texts: Any, images: Any, top_k: int = 5, return_scores: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        return self._run(self._p_best(texts, images, top_k, return_scores, transpose=False))

    def find_best_text_matches(
        self, images: Any, texts: Any, top_k: int = 5, return_scores: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        return self._run(self._p_best(texts, images, top_k, return_scores, transpose=True))

    def class_embeddings(self, class_texts: Any, templates: str | list[str] | None = None) -> np.ndarray:
        return self._run(self._p_class_embeddings(class_texts, templates))

    def classify(
        self, images: Any, labels: Any, templates: str | list[str] | None = None, top_k: int | None = None
    ) -> list[dict] | list[list[dict]]:
        return self._run(self._p_classify(images, labels, templates, top_k))

    def zero_shot_classification(
        self, images: Any, class_texts: Any, return_probabilities: bool = True, templates: list[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        return self._run(self._p_zero_shot_classification(images, class_texts, return_probabilities, templates))

    def zero_shot(self, images: Any, texts: Any, top_k: int = 5) -> dict[str, np.ndarray]:
        return self._run(self._p_zero_shot(images, texts, top_k))
