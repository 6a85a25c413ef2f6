"""CLIPClient: the synchronous Python client for the encode_text / encode_image / zero_shot ensembles."""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

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
from .errors import ModelNotFoundError, ServerError
from .inputs import encode_texts, iter_batches, normalize_texts


class CLIPClient(ClientBase):
    """Synchronous client. Thread-safe: every thread gets its own tritonclient (tritonclient.http is not thread-safe).

    >>> with CLIPClient("grpc://127.0.0.1:8001") as c:  # http://, https://, grpc://, grpcs://
    ...     c.classify("cat.jpg", ["cat", "dog"])  # [{"label": "cat", "score": 0.98}, {"label": "dog", ...}]
    """

    def __init__(self, url: str | None = None, protocol: str | None = None, **options: Any):
        super().__init__(url, protocol, **options)
        self._local = threading.local()
        self._clients: list[Any] = []
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    # ---------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> "CLIPClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close every per-thread tritonclient and the worker pool."""
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
        self._local = threading.local()

    def _triton(self):
        """This thread's tritonclient (created on first use)."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._new_tritonclient(self.timeout)
            with self._lock:
                self._clients.append(client)
            self._local.client = client
        return client

    def _new_tritonclient(self, network_timeout: float):
        """A tritonclient for this endpoint (TLS per its scheme); HTTP connects and reads time out after
        connect_timeout (or network_timeout when shorter) and network_timeout."""
        tls = tritonclient_tls(self.endpoint, self.ca_file)
        if self.protocol == "http":
            import tritonclient.http as mod

            return mod.InferenceServerClient(self.endpoint.address,
                                             connection_timeout=min(self.connect_timeout, network_timeout),
                                             network_timeout=network_timeout, **tls)
        import tritonclient.grpc as mod

        return mod.InferenceServerClient(self.endpoint.address, **tls)

    def _first_contact(self) -> None:
        """Once per client: is a Triton server there? If not, fail within connect_timeout with one clear message."""
        if self._reached:
            return
        started = time.monotonic()
        live = True
        try:
            if self.protocol == "grpc":
                client = self._triton()
                live = client.is_server_live(headers=self.headers, client_timeout=self._first_contact_budget(started))
            else:  # its own client, every read timing out with the budget; server metadata raises on any error status
                probe = self._new_tritonclient(self._first_contact_budget(started))
                try:
                    probe.get_server_metadata(headers=self.headers)
                finally:
                    probe.close()
        except Exception as exc:  # noqa: BLE001 - a transport failure raises; an error answer means a server is there
            self._first_contact_failed(exc)
        else:
            if not live:
                self._first_contact_failed(None)
        self._reached = True

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="clip-client")
            return self._pool

    # ---------------------------------------------------------------------------------- transport
    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """fn() with retries on unavailable servers (once one was reached); errors mapped to our types."""
        self._first_contact()
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - mapped below
                err = map_error(exc, what)
                if not retryable(err) or attempt == self.retries:
                    raise err from None
                delay = backoff_delay(attempt, self.backoff)
                self._log_retry(what, err, attempt, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        def once():
            kwargs = self._infer_options()
            result = self._triton().infer(model, self._make_inputs(inputs), outputs=self._make_outputs(outputs), **kwargs)
            return {n: result.as_numpy(n) for n in outputs}

        return self._call(f"infer {model}", once)

    def _model_config(self, model: str) -> dict | None:
        """A model's config JSON; None when the model is not served."""

        def once():
            if self.protocol == "grpc":
                raw = self._triton().get_model_config(model, as_json=True, client_timeout=self.timeout, headers=self.headers)
            else:
                raw = self._triton().get_model_config(model, headers=self.headers)
            return self._config_json(raw)

        try:
            return self._call(f"config {model}", once)
        except ModelNotFoundError as e:  # the model is not served; anything else propagates
            log.debug("no config for %s: %s", model, e)
            return None
        except ServerError as e:
            raise self._config_refused(model, e) from None

    # ---------------------------------------------------------------------------------- model info
    def _clip_info(self) -> ModelInfo | None:
        """ModelInfo from the clip_info model; None when the server has none (older repositories)."""
        try:
            return model_info_from_clip_info(self._infer(CLIP_INFO, {}, [CLIP_INFO_OUT])[CLIP_INFO_OUT])
        except ModelNotFoundError as e:  # only an unknown model falls back to the model configs
            log.debug("no clip_info (%s); reading model configs", e)
            return None

    def get_model_info(self) -> ModelInfo:
        """Embedding size, logit_scale, model identity and per-request limits, read from the server once.

        From the clip_info model (needs only the inference API); from the model configs when it is missing.
        """
        if self._info is None:
            self._info = self._clip_info()
        if self._info is None:
            configs = {n: self._model_config(n) for n in INFO_CONFIG_MODELS}
            probe = self._scale_probe(configs)
            self._info = self._info_from_configs(configs, None if probe is None else self._infer(*probe))
        return self._info

    @property
    def logit_scale(self) -> float:
        """The model's raw logit_scale (similarities are multiplied by exp of it)."""
        return self.get_model_info().logit_scale

    # ---------------------------------------------------------------------------------- EmbeddingProvider
    def dimension(self) -> int:
        """Embedding size (providers.EmbeddingProvider)."""
        return self.get_model_info().dim

    def model_id(self) -> str:
        """The served weights' identity (providers.EmbeddingProvider)."""
        return self.get_model_info().model_id

    def embed_texts(self, texts: str | Sequence[str]) -> np.ndarray:
        """Normalised text embeddings (n, D); one str is one text (providers.EmbeddingProvider)."""
        return np.atleast_2d(self.encode_text(texts))  # one item ((D,)) -> (1, D)

    def embed_images(self, images: Any) -> np.ndarray:
        """Normalised image embeddings (n, D); one image is one item (providers.MultimodalEmbeddingProvider)."""
        return np.atleast_2d(self.encode_image(images))  # one item ((D,)) -> (1, D)

    # ---------------------------------------------------------------------------------- encoding
    def _stream(self, batches: Iterator[list[bytes]], send: Callable[[list[bytes]], np.ndarray], bar) -> list[np.ndarray]:
        """send(batch) for each batch, up to max_concurrency at once, reading batches only as slots free up;
        the answers in input order. A lone batch is sent from the calling thread."""
        first = next(batches, None)
        second = None if first is None else next(batches, None)
        if second is None:
            parts = [] if first is None else [send(first)]
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
                pending.append(self._executor().submit(send, batch))
                while len(pending) >= self.max_concurrency:
                    collect()
            while pending:
                collect()
        finally:
            for f in pending:
                f.cancel()
        return parts

    def _encode(self, inputs: Any, kind: str, normalize: bool, batch_size: int | None, show_progress: bool) -> np.ndarray:
        info = self.get_model_info()
        model, name, out = self._route(kind)
        batches = iter_batches(self._item_bytes(inputs, kind), self._batch_limit(info, kind, batch_size),
                               self.max_request_bytes)
        with progress_bar(inputs, show_progress, kind) as bar:
            parts = self._stream(batches, lambda b: self._infer(model, {name: bytes_tensor(b)}, [out])[out], bar)
        return self._embeddings(parts, info.dim, normalize, inputs, kind)

    def encode_text(self, texts: str | Iterable[str], normalize: bool = True, *, batch_size: int | None = None,
                    show_progress: bool = False) -> np.ndarray:
        """Text embeddings, float32, L2-normalised unless normalize=False: (D,) for one str, (N, D) for an iterable.

        Any iterable works (a generator is consumed batch by batch); batch_size caps the texts per request.
        """
        return self._encode(texts, "text", normalize, batch_size, show_progress)

    def encode_image(self, images: Any, normalize: bool = True, *, batch_size: int | None = None,
                     show_progress: bool = False) -> np.ndarray:
        """Image embeddings, float32: (D,) for one image, (N, D) for an iterable of them (or a uint8 (N, H, W, 3)).

        An image is a file path, an http(s) URL (fetched here, at most max_download_bytes), encoded bytes, a PIL
        image or a uint8 (H, W, 3) array. Iterables are read lazily, batch by batch.
        """
        return self._encode(images, "image", normalize, batch_size, show_progress)

    def _text_matrix(self, texts: Any) -> np.ndarray:
        e = as_embeddings(texts)
        return self.encode_text(texts) if e is None else e

    def _image_matrix(self, images: Any) -> np.ndarray:
        e = as_embeddings(images)
        return self.encode_image(images) if e is None else e

    # ---------------------------------------------------------------------------------- similarity
    def compute_similarity(self, texts: Any, images: Any, apply_temperature: bool = True) -> np.ndarray:
        """(n_texts, n_images): cosine similarity, times exp(logit_scale) when apply_temperature (CLIP's logits).

        texts / images: precomputed embeddings (float arrays (D,) or (N, D)), or texts / images to encode.
        """
        t, i = self._text_matrix(texts), self._image_matrix(images)
        scale = self.get_model_info().scale if apply_temperature else 1.0
        return ops.similarity(t, i, scale)

    def find_best_matches(self, texts: Any, images: Any, top_k: int = 5, return_scores: bool = False):
        """Top-k image indices per text (n_texts, min(k, n_images)), best first; with return_scores, (indices, logits).

        texts / images: embeddings or inputs, as for compute_similarity.
        """
        return ops.ranked(self.compute_similarity(texts, images), top_k, return_scores)

    def find_best_text_matches(self, images: Any, texts: Any, top_k: int = 5, return_scores: bool = False):
        """Top-k text indices per image (n_images, min(k, n_texts)), best first; with return_scores, (indices, logits)."""
        return ops.ranked(self.compute_similarity(texts, images).T, top_k, return_scores)

    def class_embeddings(self, class_texts: Any, templates: str | list[str] | None = None) -> np.ndarray:
        """Normalised class embeddings (C, D): per class, templates' embeddings normalised, averaged, re-normalised.

        Prompt embeddings are cached: a prompt already seen is not sent again.
        """
        job = self._prompt_job(class_texts, templates)
        encoded = (self.encode_text(job.missing, normalize=False)) if job.missing else None
        return self._class_matrix(job, encoded)

    def classify(self, images: Any, labels: Any, templates: str | list[str] | None = None, top_k: int | None = None):
        """Zero-shot: per image, [{"label": ..., "score": ...}] sorted by score, best first (scores sum to 1 over
        all labels); one list for one image, a list of lists for several (the transformers pipeline's shape).

        Each label is put into `templates` (default DEFAULT_TEMPLATE, "a photo of a {}."; several are averaged;
        ["{}"] uses the bare labels). images: anything encode_image takes, or precomputed image embeddings.
        """
        names = normalize_texts(labels)
        cls = self.class_embeddings(names, templates or [DEFAULT_TEMPLATE])
        img = self._image_matrix(images)
        return self._classified(images, img, cls, names, self.get_model_info().scale, top_k)

    def zero_shot_classification(
        self, images: Any, class_texts: Any, return_probabilities: bool = True, templates: list[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(predictions, probabilities): predictions are class INDICES (n_images,) int64 into class_texts;
        probabilities (n_images, n_classes) float32 are the softmax over classes of exp(logit_scale) * cosine,
        as the zero_shot ensemble's `probs` (None when return_probabilities=False). Bare class texts unless
        templates are given; classify() gives [{label, score}] with a default template.
        """
        cls = self.class_embeddings(class_texts, templates)
        return classify_result(self.encode_image(images), cls, self.get_model_info().scale, return_probabilities)

    def zero_shot(self, images: Any, texts: Any, top_k: int = 5) -> dict[str, np.ndarray]:
        """One raw call of the zero_shot ensemble (all its outputs); inputs must fit in one request."""
        t, i = list(encode_texts(texts)), list(self._item_bytes(images, "image"))
        return self._infer(
            ZERO_SHOT,
            {ZeroShot.TEXT: bytes_tensor(t), ZeroShot.IMAGE: bytes_tensor(i),
             ZeroShot.TOP_K: np.array([top_k], dtype=np.int32)},
            list(ZeroShot.OUTPUTS),
        )
