"""The one implementation behind CLIPClient and AsyncCLIPClient (sans-I/O).

Every public method is written once here, as a *plan*: a generator that yields effects (send this request, stream
these batches, read these configs, run these two plans, run this blocking function) and receives their results.
The transports only perform effects: client.py with threads and blocking calls, aio.py with asyncio. Options,
model discovery (clip_info), answer checks, retries with their deadline, identity checks and the prompt cache
live here and in the modules this one imports (_info, _protocol, _status, _cache, _results).
"""

from __future__ import annotations

import logging
import numbers
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clip_common.endpoint import Endpoint, EndpointError, parse_endpoint

from . import ops
from ._api import documented
from ._cache import PromptCache
from ._info import (
    CLIP_INFO,
    ENCODE_IMAGE,
    ENCODE_TEXT,
    INFO_CONFIG_MODELS,
    POSTPROCESS,
    ModelInfo,
    build_model_info,
    check_model_name,
    clip_info_json,
    fallback_identity_probe,
    logit_scale_from_zero_shot,
    model_info_from_clip_info,
    model_prefix,
)
from ._protocol import Request, check_identity, clip_info_request, embed_request, probe_request, zero_shot_request
from ._results import as_embeddings, classify_result, embeddings, is_single, model_logits, progress_bar, ranked_labels
from ._status import (
    TIMEOUT,
    UNAVAILABLE,
    backoff_delay,
    is_connection_error,
    is_restricted,
    map_error,
    message_of,
    retryable,
    status_of,
    unreachable_message,
)
from .errors import (
    CLIPClientError,
    InvalidInputError,
    ModelChangedError,
    ModelNotFoundError,
    ServerError,
    ServerTimeoutError,
    ServerUnavailableError,
)
from .inputs import DEFAULT_DOWNLOAD_BYTES, by_length, encode_images, encode_texts, iter_batches, normalize_texts

__all__ = [
    "DEFAULT_TEMPLATE",
    "ClientBase",
    "ModelInfo",
    "backoff_delay",
    "map_error",
    "retryable",
    "unreachable_message",
]

log = logging.getLogger("clip_client")

# The prompt `classify` wraps each label in unless told otherwise, as transformers' zero-shot-image-classification
# pipeline does (zero_shot_classification keeps bare labels).
DEFAULT_TEMPLATE = "This is a photo of {}."
CONNECT_TIMEOUT = 3.0  # seconds the first contact may take before the server counts as unreachable
IMAGE_SPLIT_MIN = 8  # images per request below which a sized image call is not split further


# ------------------------------------------------------------------------------------------------ effects
@dataclass
class Infer:
    """Send one request (retries and deadline included); the result is request.check's value."""

    request: Request


@dataclass
class Stream:
    """Send make(batch) for each batch, up to max_concurrency at once; the checked answers in batch order."""

    batches: Iterator[list[bytes]]
    make: Callable[[list[bytes]], Request]
    bar: Any


@dataclass
class Configs:
    """Read these models' configs; {name: config or None when not served}."""

    models: tuple[str, ...]


@dataclass
class Both:
    """Run two plans (concurrently where the transport can); (result of the first, result of the second)."""

    first: Generator
    second: Generator


@dataclass
class Blocking:
    """Run a blocking function (file reads, URL fetches) off the event loop; its result."""

    fn: Callable[[], Any]


Plan = Generator[Any, Any, Any]


# ------------------------------------------------------------------------------------------------ the core
@documented
class ClientBase:
    """Options, model discovery, answer checks, the retry policy, the prompt cache and every public method's plan,
    shared by CLIPClient and AsyncCLIPClient."""

    def __init__(
        self,
        url: str | None = None,
        protocol: str | None = None,
        timeout: float = 60.0,
        retries: int = 8,
        backoff: float = 0.5,  # with retries=8: 23-46 s of retrying, longer than a supervised restart (10-25 s)
        max_concurrency: int = 4,
        max_request_bytes: int = 32 * 1024 * 1024,
        max_items: int | None = None,
        prompt_cache_size: int = 4096,
        headers: dict[str, str] | None = None,
        ca_file: str | Path | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        max_download_bytes: int = DEFAULT_DOWNLOAD_BYTES,
        model: str | None = None,
    ):
        try:
            self.endpoint: Endpoint = parse_endpoint(url, protocol)
        except EndpointError as e:
            raise InvalidInputError(str(e)) from None
        if timeout <= 0 or retries < 0 or max_concurrency < 1 or connect_timeout <= 0 or max_download_bytes < 1:
            raise InvalidInputError(
                "timeout and connect_timeout must be > 0, retries >= 0, max_concurrency >= 1, max_download_bytes >= 1"
            )
        if ca_file is not None:
            if not self.endpoint.tls:
                raise InvalidInputError(f"ca_file is for TLS: use an https:// or grpcs:// URL, not {self.endpoint.url}")
            if not Path(ca_file).is_file():
                raise InvalidInputError(f"ca_file {str(ca_file)!r} is not a file")
        self.protocol = self.endpoint.protocol
        self.url = self.endpoint.url  # canonical, scheme included
        self.model = check_model_name(model)
        self.ca_file = None if ca_file is None else str(ca_file)
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_concurrency = int(max_concurrency)
        self.max_request_bytes = int(max_request_bytes)
        self.max_items = max_items  # caps the server-derived limit when set
        self.max_download_bytes = int(max_download_bytes)
        self.headers = headers
        self._reached = False  # a Triton server answered once: from then on, failures are retried
        self._info: ModelInfo | None = None
        self._prompt_cache = PromptCache(prompt_cache_size)
        self._answered: set[str] = set()  # Triton models that answered this client (NOT_FOUND then means unloading)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r}" + (f", model={self.model!r})" if self.model else ")")

    def clear_cache(self) -> None:
        """Forget cached prompt embeddings and the model info (e.g. after the server's model changed)."""
        self._prompt_cache.clear()
        self._info = None

    # ---- requests: deadline, answers, retries
    def _deadline_left(self, deadline: float, what: str) -> float:
        """Seconds left before `deadline` (time.monotonic()); ServerTimeoutError when none are."""
        left = deadline - time.monotonic()
        if left <= 0:
            err = ServerTimeoutError(
                f"{what}: timed out: no answer within the {self.timeout:g} s deadline (server {self.url})"
            )
            err.url = self.url
            raise err
        return left

    def _answer(self, request: Request, outputs: dict[str, Any]) -> Any:
        """The checked value of an answer: identity first (another model explains any other difference), then the
        request's own checks."""
        if self._info is not None and not request.model.endswith(CLIP_INFO):
            check_identity(outputs, self._info.model_id, request.model, self.url)
        value = request.check(outputs, self.url)
        self._answered.add(request.model)
        return value

    def _retry_delay(self, err: CLIPClientError, attempt: int, deadline: float, what: str) -> float | None:
        """Seconds to wait before retry number `attempt` + 1, or None to give up (not retryable, retries spent, or
        the wait would pass the deadline: retries happen inside the request's deadline)."""
        if isinstance(err, ModelChangedError):
            self.clear_cache()
            return None
        if not retryable(err) or attempt >= self.retries:
            return None
        delay = backoff_delay(attempt, self.backoff)
        if time.monotonic() + delay >= deadline:
            log.warning("%s; not retried: the next retry would pass the %g s deadline", err, self.timeout)
            return None
        self._log_retry(what, err, attempt, delay)
        return delay

    def _mapped(self, exc: BaseException, what: str, model: str) -> CLIPClientError:
        return map_error(exc, what, self.url, known_model=model in self._answered)

    def _log_retry(self, what: str, err: CLIPClientError, attempt: int, delay: float) -> None:
        text = str(err) if str(err).startswith(what) else f"{what}: {err}"
        log.warning("%s; retry %d/%d in %.2f s", text, attempt + 1, self.retries, delay)

    @staticmethod
    def _outputs(result: Any) -> dict[str, Any]:
        """Every output of a tritonclient InferResult (HTTP or gRPC) by name, as numpy arrays."""
        response = result.get_response()
        if isinstance(response, dict):
            names = [o.get("name") for o in response.get("outputs") or [] if isinstance(o, dict)]
        else:
            names = [o.name for o in response.outputs]
        return {n: result.as_numpy(n) for n in names if n}

    def _make_inputs(self, named: dict[str, np.ndarray]) -> list:
        mod = self._module()
        inputs = []
        for name, arr in named.items():
            dtype = "BYTES" if arr.dtype == object else {np.dtype(np.int32): "INT32"}[arr.dtype]
            inp = mod.InferInput(name, list(arr.shape), dtype)
            if self.protocol == "http":
                inp.set_data_from_numpy(arr, binary_data=True)
            else:
                inp.set_data_from_numpy(arr)
            inputs.append(inp)
        return inputs

    def _module(self):  # the tritonclient module providing InferInput
        if self.protocol == "http":
            import tritonclient.http as mod
        else:
            import tritonclient.grpc as mod
        return mod

    @staticmethod
    def _config_json(raw: Any) -> dict:
        """get_model_config's answer (HTTP dict, gRPC {'config': {...}}) -> the config dict."""
        if isinstance(raw, dict) and "config" in raw and isinstance(raw["config"], dict):
            return raw["config"]
        return raw

    # ---- connecting
    def _first_contact_failed(self, exc: BaseException | None) -> None:
        """Before any server answered: raise one clear ServerUnavailableError, no retries. Returns only when `exc`
        is an error status that a server answered (then the address is right and the normal handling applies).
        exc=None: the health probe was answered with "not live"."""
        proto = {"http": "HTTP", "grpc": "gRPC"}[self.protocol]
        status = "" if exc is None else status_of(exc)
        if exc is None:
            reason = "something answers there, but not as a live Triton server (its health/live check said no)"
        elif status == "StatusCode.UNIMPLEMENTED":  # Triton's gRPC service has ServerLive: not it (HTTP port?)
            reason = f"something answers there, but not Triton's gRPC service ({message_of(exc).splitlines()[0][:200]})"
        elif status and status not in UNAVAILABLE and status not in TIMEOUT:
            return  # a status a server answered (e.g. a gateway that rate-limits or refuses the health API)
        elif isinstance(exc, TimeoutError) or status in TIMEOUT:
            reason = f"no answer within {self.connect_timeout:g} s"
        elif status or is_connection_error(exc):
            reason = (message_of(exc).splitlines() or [type(exc).__name__])[0][:300] or type(exc).__name__
        else:  # e.g. an HTTP client at a gRPC port cannot even parse the answer
            reason = f"the answer is not {proto} ({type(exc).__name__}: {str(message_of(exc)).splitlines()[0][:200]})"
        err = ServerUnavailableError(unreachable_message(self.endpoint, reason))
        err.url = self.url
        raise err from None

    def _first_contact_budget(self, started: float) -> float:
        """Seconds left of connect_timeout for the first contact that began at `started` (time.monotonic()):
        creating the tritonclient (its imports) counts too, so the first failure comes within connect_timeout."""
        return max(0.1, self.connect_timeout - (time.monotonic() - started))

    def _config_refused(self, model: str, err: CLIPClientError) -> CLIPClientError:
        """The error for a model config the server would not give while it has no clip_info model."""
        if not is_restricted(err):
            return err
        refused = ServerError(
            f"the server at {self.url} has no {CLIP_INFO} model and its model configuration API is restricted "
            f"({err}): the client needs one of them to learn the model's size and limits. Serve a repository "
            "built with clip_info, or pass the admin key in headers (x-clip-admin-key, over gRPC "
            "triton-grpc-protocol-x-clip-admin-key)"
        )
        refused.status, refused.url = err.status, self.url
        return refused

    def _batch_limit(self, info: ModelInfo, kind: str, batch_size: int | None) -> int:
        """Items per request: the server's limit, capped by max_items and the call's batch_size."""
        n = info.max_text_items if kind == "text" else info.max_image_items
        if self.max_items:
            n = min(n, self.max_items)
        if batch_size is not None:
            if (
                isinstance(batch_size, (bool, np.bool_))
                or not isinstance(batch_size, numbers.Integral)
                or batch_size < 1
            ):
                raise InvalidInputError(f"batch_size must be a positive int, got {batch_size!r}")
            n = min(n, int(batch_size))
        return n

    def _item_bytes(self, inputs: Any, kind: str):
        """The BYTES items of a call's texts or images, produced lazily (files are read and URLs fetched on demand)."""
        if kind == "text":
            return encode_texts(inputs)
        return encode_images(inputs, max_download_bytes=self.max_download_bytes, download_timeout=self.timeout)

    # ================================================================================ plans (one per method)
    def _p_info(self) -> Plan:
        info = self._info
        if info is None:
            info = yield from self._p_discover()
            self._info = info
        return info

    def _p_discover(self) -> Plan:
        """ModelInfo from clip_info (the unprefixed one lists the repository's models; model= picks one), else
        from the model configs (repositories built before clip_info)."""
        try:
            first = clip_info_json((yield Infer(clip_info_request(""))))
        except ModelNotFoundError:
            if self.model is not None:
                raise ModelNotFoundError(
                    f"the server at {self.url} has no {CLIP_INFO} model, so it cannot name its models: "
                    f"model={self.model!r} needs a repository built with clip_info"
                ) from None
            log.debug("no clip_info; reading model configs")
            return (yield from self._p_info_from_configs())
        prefix = "" if self.model is None else model_prefix(first, self.model)
        data = clip_info_json((yield Infer(clip_info_request(prefix)))) if prefix else first
        return model_info_from_clip_info(data, prefix)

    def _p_info_from_configs(self) -> Plan:
        configs = yield Configs(INFO_CONFIG_MODELS)
        if configs[ENCODE_TEXT] is None and configs[ENCODE_IMAGE] is None:
            raise ServerError(f"the server at {self.url} serves neither encode_text nor encode_image")
        post = configs[POSTPROCESS]
        scale = None
        if post is None or "logit_scale" not in (post.get("parameters") or {}):
            log.warning("postprocess config has no logit_scale; reading it through a zero_shot call")
            scale = logit_scale_from_zero_shot((yield Infer(probe_request("", fallback_identity_probe()))))
        return build_model_info(configs, scale)

    def _p_encode(
        self, inputs: Any, kind: str, normalize: bool = True, batch_size: int | None = None, show_progress: bool = False
    ) -> Plan:
        info = yield from self._p_info()
        limit = self._batch_limit(info, kind, batch_size)
        if (
            kind == "image"
            and batch_size is None
            and self.max_concurrency > 1
            and hasattr(inputs, "__len__")
            and not is_single(inputs, kind)
        ):
            # Two requests at least: the second's decoding overlaps the first's encoding (one call of 64 images on
            # 2 cores: 12.2 images/s as 2 x 32 vs 10.7 as 1 x 64, docs/benchmarks.md).
            limit = min(limit, max(IMAGE_SPLIT_MIN, -(-len(inputs) // 2)))
        items, order = self._item_bytes(inputs, kind), []
        if kind == "text":  # similar lengths per request (each batch is padded to its longest); answers put back.
            # The window is what the requests in flight hold anyway: an iterable is still read only that far ahead.
            items = by_length(items, self.max_concurrency * limit, order)
        batches = iter_batches(items, limit, self.max_request_bytes)
        with progress_bar(inputs, show_progress, kind) as bar:
            parts = yield Stream(batches, lambda b: embed_request(info.prefix, kind, b, info.dim), bar)
        result = embeddings(parts, info.dim, normalize, is_single(inputs, kind))
        if len(order) > 1:
            result[np.asarray(order)] = result.copy()  # row k answered input order[k]
        return result

    def _p_matrix(self, x: Any, kind: str) -> Plan:
        e = as_embeddings(x)
        if e is None:
            e = yield from self._p_encode(x, kind)
        return e

    def _p_dimension(self) -> Plan:
        return (yield from self._p_info()).dim

    def _p_model_id(self) -> Plan:
        return (yield from self._p_info()).model_id

    def _p_logit_scale(self) -> Plan:
        return (yield from self._p_info()).logit_scale

    def _p_embed(self, inputs: Any, kind: str) -> Plan:
        return np.atleast_2d((yield from self._p_encode(inputs, kind)))  # one item ((D,)) -> (1, D)

    def _p_similarity(self, texts: Any, images: Any, apply_temperature: bool = True) -> Plan:
        for given, name in ((as_embeddings(texts), "texts"), (as_embeddings(images), "images")):
            if given is not None:
                ops.check_embeddings(given, name)  # refused before any request
        if apply_temperature or as_embeddings(texts) is None or as_embeddings(images) is None:
            yield from self._p_info()  # once, before the two encodings run side by side
        t, i = yield Both(self._p_matrix(texts, "text"), self._p_matrix(images, "image"))
        cosine = ops.similarity(t, i)
        if not apply_temperature:
            return cosine
        return model_logits((yield from self._p_info()), cosine)

    def _p_best(self, texts: Any, images: Any, top_k: int, return_scores: bool, transpose: bool) -> Plan:
        ops.check_k(top_k)
        scores = yield from self._p_similarity(texts, images)
        return ops.ranked(scores.T if transpose else scores, top_k, return_scores)

    def _p_class_embeddings(self, class_texts: Any, templates: str | list[str] | None = None) -> Plan:
        job = self._prompt_cache.job(class_texts, templates)
        encoded = (yield from self._p_encode(job.missing, "text", normalize=False)) if job.missing else None
        return self._prompt_cache.class_matrix(job, encoded)

    def _p_classify(self, images: Any, labels: Any, templates: str | list[str] | None, top_k: int | None) -> Plan:
        names = normalize_texts(labels)
        if top_k is not None:
            ops.check_k(top_k)
        yield from self._p_info()
        cls, img = yield Both(
            self._p_class_embeddings(names, templates or [DEFAULT_TEMPLATE]), self._p_matrix(images, "image")
        )
        rows = ranked_labels(img, cls, names, (yield from self._p_info()), top_k)
        single = img.ndim == 1 if as_embeddings(images) is not None else is_single(images, "image")
        return rows[0] if single else rows

    def _p_zero_shot_classification(
        self, images: Any, class_texts: Any, return_probabilities: bool, templates: list[str] | None
    ) -> Plan:
        yield from self._p_info()
        cls, img = yield Both(self._p_class_embeddings(class_texts, templates), self._p_encode(images, "image"))
        return classify_result(img, cls, (yield from self._p_info()), return_probabilities)

    def _p_zero_shot(self, images: Any, texts: Any, top_k: int) -> Plan:
        k = ops.check_k(top_k)
        t = list(encode_texts(texts))
        i = yield Blocking(lambda: list(self._item_bytes(images, "image")))
        info = yield from self._p_info()
        return (yield Infer(zero_shot_request(info.prefix, t, i, k, info.dim)))
