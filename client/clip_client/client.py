"""CLIPClient: the synchronous Python client for the encode_text / encode_image / zero_shot ensembles."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from clip_common.contract import ZeroShot

from . import ops
from ._core import (
    ENCODE_IMAGE,
    ENCODE_TEXT,
    IMAGE_IN,
    IMAGE_OUT,
    INFO_CONFIG_MODELS,
    TEXT_IN,
    TEXT_OUT,
    ZERO_SHOT,
    CLIP_INFO,
    CLIP_INFO_OUT,
    ClientBase,
    ModelInfo,
    backoff_delay,
    bytes_tensor,
    classify_result,
    log,
    map_error,
    model_info_from_clip_info,
    retryable,
)
from .errors import CLIPClientError, ServerError, ServerTimeoutError, ServerUnavailableError
from .inputs import chunk_spans, encode_images, encode_texts, normalize_texts


class CLIPClient(ClientBase):
    """Synchronous client. Thread-safe: every thread gets its own tritonclient (tritonclient.http is not thread-safe).

    >>> with CLIPClient("127.0.0.1:8001") as c:
    ...     probs = c.zero_shot_classification("cat.jpg", ["a cat", "a dog"])[1]
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc", **options: Any):
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
            if self.protocol == "http":
                import tritonclient.http as mod

                client = mod.InferenceServerClient(
                    self.url, connection_timeout=self.timeout, network_timeout=self.timeout
                )
            else:
                import tritonclient.grpc as mod

                client = mod.InferenceServerClient(self.url)
            with self._lock:
                self._clients.append(client)
            self._local.client = client
        return client

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="clip-client")
            return self._pool

    # ---------------------------------------------------------------------------------- transport
    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """fn() with retries on unavailable servers; errors mapped to our types."""
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - mapped below
                err = map_error(exc, what)
                if not retryable(err) or attempt == self.retries:
                    raise err from None
                delay = backoff_delay(attempt, self.backoff)
                log.debug("%s: %s; retry %d/%d in %.2fs", what, err, attempt + 1, self.retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        def once():
            kwargs: dict[str, Any] = {"headers": self.headers}
            if self.protocol == "grpc":
                kwargs["client_timeout"] = self.timeout
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
        except ServerError as e:  # e.g. NOT_FOUND: the model is not served; timeouts / unavailable propagate
            log.debug("no config for %s: %s", model, e)
            return None

    def _map(self, fn: Callable[[Any], Any], jobs: list[Any]) -> list[Any]:
        """fn over jobs, concurrently on the pool when there are several; results in order."""
        if len(jobs) <= 1:
            return [fn(j) for j in jobs]
        return list(self._executor().map(fn, jobs))

    # ---------------------------------------------------------------------------------- model info
    def _clip_info(self) -> ModelInfo | None:
        """ModelInfo from the clip_info model; None when the server has none (older repositories)."""
        try:
            return model_info_from_clip_info(self._infer(CLIP_INFO, {}, [CLIP_INFO_OUT])[CLIP_INFO_OUT])
        except (ServerUnavailableError, ServerTimeoutError):
            raise
        except CLIPClientError as e:  # unknown model: fall back to the model configs
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

    # ---------------------------------------------------------------------------------- encoding
    def _encode(self, items: list[bytes], kind: str, normalize: bool) -> np.ndarray:
        info = self.get_model_info()
        model, name, out = (ENCODE_TEXT, TEXT_IN, TEXT_OUT) if kind == "text" else (ENCODE_IMAGE, IMAGE_IN, IMAGE_OUT)
        if not items:
            return np.zeros((0, info.dim), np.float32)
        spans = chunk_spans([len(b) for b in items], self._limits(info, kind), self.max_request_bytes)
        parts = self._map(lambda s: self._infer(model, {name: bytes_tensor(items[s[0]:s[1]])}, [out])[out], spans)
        embeds = np.concatenate(parts, axis=0).astype(np.float32, copy=False)  # (N, D)
        return ops.l2_normalize(embeds) if normalize else embeds

    def encode_text(self, texts: str | list[str], normalize: bool = True) -> np.ndarray:
        """Text embeddings (n, D) float32, L2-normalised unless normalize=False."""
        return self._encode(encode_texts(normalize_texts(texts)), "text", normalize)

    def encode_image(self, images: Any, normalize: bool = True) -> np.ndarray:
        """Image embeddings (n, D) float32; images: path, bytes, PIL image, uint8 (H, W, 3) array, or a batch of those."""
        return self._encode(encode_images(images), "image", normalize)

    # ---------------------------------------------------------------------------------- similarity
    def compute_similarity(
        self, text_embeddings: np.ndarray, image_embeddings: np.ndarray, apply_temperature: bool = True
    ) -> np.ndarray:
        """Cosine similarity (n_texts, n_images), times exp(logit_scale) when apply_temperature (CLIP's logits)."""
        scale = self.get_model_info().scale if apply_temperature else 1.0
        return ops.similarity(text_embeddings, image_embeddings, scale)

    def find_best_matches(self, texts: Any, images: Any, top_k: int = 5, return_scores: bool = False):
        """Top-k image indices per text (n_texts, min(k, n_images)), best first; with return_scores, (indices, logits)."""
        logits = self.compute_similarity(self.encode_text(texts), self.encode_image(images))  # (T, I)
        idx = ops.topk_indices(logits, top_k)
        return (idx, np.take_along_axis(logits, idx, axis=1)) if return_scores else idx

    def find_best_text_matches(self, images: Any, texts: Any, top_k: int = 5, return_scores: bool = False):
        """Top-k text indices per image (n_images, min(k, n_texts)), best first; with return_scores, (indices, logits)."""
        logits = self.compute_similarity(self.encode_text(texts), self.encode_image(images)).T  # (I, T)
        idx = ops.topk_indices(logits, top_k)
        return (idx, np.take_along_axis(logits, idx, axis=1)) if return_scores else idx

    def class_embeddings(self, class_texts: Any, templates: list[str] | None = None) -> np.ndarray:
        """Normalised class embeddings (C, D): per class, templates' embeddings normalised, averaged, re-normalised.

        Prompt embeddings are cached: a prompt already seen is not sent again.
        """
        job = self._prompt_job(class_texts, templates)
        encoded = (self.encode_text(job.missing, normalize=False)) if job.missing else None
        return self._class_matrix(job, encoded)

    def zero_shot_classification(
        self, images: Any, class_texts: Any, return_probabilities: bool = True, templates: list[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(predictions, probabilities): predictions are class INDICES (n_images,) int64 into class_texts;
        probabilities (n_images, n_classes) float32 are the softmax over classes of exp(logit_scale) * cosine,
        as the zero_shot ensemble's `probs` (None when return_probabilities=False).
        """
        cls = self.class_embeddings(class_texts, templates)
        return classify_result(self.encode_image(images), cls, self.get_model_info().scale, return_probabilities)

    def zero_shot(self, images: Any, texts: Any, top_k: int = 5) -> dict[str, np.ndarray]:
        """One raw call of the zero_shot ensemble (all its outputs); inputs must fit in one request."""
        t, i = encode_texts(normalize_texts(texts)), encode_images(images)
        return self._infer(
            ZERO_SHOT,
            {ZeroShot.TEXT: bytes_tensor(t), ZeroShot.IMAGE: bytes_tensor(i),
             ZeroShot.TOP_K: np.array([top_k], dtype=np.int32)},
            list(ZeroShot.OUTPUTS),
        )
