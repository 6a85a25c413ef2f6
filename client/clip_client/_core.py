"""What the sync and async clients share: protocol glue, error mapping, retries policy, model info, caches."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import random
import re
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clip_common import contract as C
from clip_common.endpoint import DEFAULT_PORTS, Endpoint, EndpointError, parse_endpoint

from . import ops
from .errors import (CLIPClientError, InvalidInputError, ModelNotFoundError, RateLimitedError, ServerError,
                     ServerTimeoutError, ServerUnavailableError)
from .inputs import DEFAULT_DOWNLOAD_BYTES, encode_images, encode_texts, is_single_image, is_single_text, normalize_texts

log = logging.getLogger("clip_client")

# The prompt `classify` wraps each label in unless told otherwise (zero_shot_classification keeps bare labels).
DEFAULT_TEMPLATE = "a photo of a {}."
CONNECT_TIMEOUT = 3.0  # seconds the first contact may take before the server counts as unreachable

# Public ensembles and their tensors: clip_common.contract (docs/ARCHITECTURE.md).
ENCODE_TEXT, ENCODE_IMAGE, ZERO_SHOT = C.EncodeText.NAME, C.EncodeImage.NAME, C.ZeroShot.NAME
TEXT_IN, IMAGE_IN = C.EncodeText.TEXT, C.EncodeImage.IMAGE
TEXT_OUT, IMAGE_OUT = C.EncodeText.TEXT_EMBEDS, C.EncodeImage.IMAGE_EMBEDS
# Models whose configs bound how many items one request may carry.
TEXT_LIMIT_MODELS = (C.PreprocessText.NAME, C.TextEncoder.NAME)
IMAGE_LIMIT_MODELS = (C.PreprocessImage.NAME, C.ImageEncoder.NAME)
POSTPROCESS = C.Postprocess.NAME
CLIP_INFO, CLIP_INFO_OUT = C.ClipInfo.NAME, C.ClipInfo.INFO  # identity + limits as JSON; works with model-config restricted
# Configs read by get_model_info when the server has no clip_info model.
INFO_CONFIG_MODELS = (POSTPROCESS, ENCODE_TEXT, ENCODE_IMAGE, *TEXT_LIMIT_MODELS, *IMAGE_LIMIT_MODELS)
ITEM_LIMIT_PARAM = "max_items_per_request"  # the preprocessors' parameter
FALLBACK_MAX_ITEMS = 64


@dataclass(frozen=True)
class ModelInfo:
    """What the client knows about the served model, read once from the model configs."""

    model_id: str  # identity used to tag galleries; from postprocess's `model_id` parameter when present
    dim: int  # embedding size D
    logit_scale: float  # raw learned value; logits use exp(logit_scale)
    max_text_items: int  # texts per request
    max_image_items: int  # images per request
    identity_source: str = "postprocess.model_id"  # or "fallback" (derived from configs, weaker)

    @property
    def scale(self) -> float:
        """exp(logit_scale), the multiplier applied to cosine similarities."""
        return math.exp(self.logit_scale)

    def identity(self) -> dict:
        """JSON-able identity stored in gallery metadata."""
        d = asdict(self)
        d.pop("max_text_items")
        d.pop("max_image_items")
        return d


def config_parameter(config: dict | None, name: str) -> str | None:
    """A `parameters {}` entry of a model config JSON (string_value), or None."""
    if not config:
        return None
    value = (config.get("parameters") or {}).get(name)
    if isinstance(value, dict):
        value = value.get("string_value")
    return None if value in (None, "") else str(value)


def output_dim(config: dict | None, name: str) -> int | None:
    """Last dim of output `name` in a model config JSON, when it is fixed."""
    for out in (config or {}).get("output", []):
        if out.get("name") == name and out.get("dims"):
            d = int(out["dims"][-1])
            return d if d > 0 else None
    return None


def item_limit(configs: list[dict | None]) -> int:
    """Smallest positive max_batch_size / max-items parameter over configs (FALLBACK_MAX_ITEMS if none)."""
    limits = []
    for c in configs:
        if not c:
            continue
        mbs = int(c.get("max_batch_size") or 0)
        if mbs > 0:
            limits.append(mbs)
        v = config_parameter(c, ITEM_LIMIT_PARAM)
        if v is not None:
            try:
                limits.append(int(v))
            except ValueError:
                log.warning("ignoring non-integer parameter %s=%r", ITEM_LIMIT_PARAM, v)
    limits = [x for x in limits if x > 0]
    return min(limits) if limits else FALLBACK_MAX_ITEMS


def build_model_info(configs: dict[str, dict | None], logit_scale: float | None = None) -> ModelInfo:
    """ModelInfo from the configs of the public ensembles, their composing models and postprocess."""
    post = configs.get(POSTPROCESS)
    dim = output_dim(configs.get(ENCODE_TEXT), TEXT_OUT) or output_dim(configs.get(ENCODE_IMAGE), IMAGE_OUT)
    if dim is None:
        dim = output_dim(configs.get(C.TextEncoder.NAME), C.TextEncoder.TEXT_EMBEDS)
    if dim is None:
        raise ServerError("cannot read the embedding size from the encode_text / encode_image configs")
    if logit_scale is None:
        raw = config_parameter(post, "logit_scale")
        if raw is None:
            raise ServerError("the postprocess config has no logit_scale parameter")
        logit_scale = float(raw)
    model_id = config_parameter(post, "model_id")
    source = "postprocess.model_id"
    if model_id is None:
        # Weaker identity: derived from what the configs expose (no weights hash available to the client).
        blob = json.dumps({"dim": dim, "logit_scale": round(logit_scale, 6),
                           "encoders": [(configs.get(m) or {}).get("name") for m in C.ENCODERS]},
                          sort_keys=True)
        model_id = "cfg-" + hashlib.sha256(blob.encode()).hexdigest()[:16]
        source = "fallback"
    return ModelInfo(
        model_id=model_id,
        dim=dim,
        logit_scale=float(logit_scale),
        max_text_items=item_limit([configs.get(m) for m in (ENCODE_TEXT, *TEXT_LIMIT_MODELS)]),
        max_image_items=item_limit([configs.get(m) for m in (ENCODE_IMAGE, *IMAGE_LIMIT_MODELS)]),
        identity_source=source,
    )


def model_info_from_clip_info(out: np.ndarray | bytes | str) -> ModelInfo:
    """ModelInfo from the clip_info model's `info` output (JSON, BYTES [1])."""
    if isinstance(out, np.ndarray):
        out = out.reshape(-1)[0]
    try:
        info = json.loads(out.decode("utf-8") if isinstance(out, (bytes, bytearray, np.bytes_)) else str(out))
        per_request = int(info.get("max_items_per_request") or FALLBACK_MAX_ITEMS)
        return ModelInfo(
            model_id=str(info["model_id"]),
            dim=int(info["projection_dim"]),
            logit_scale=float(info["logit_scale"]),
            max_text_items=int(info.get("max_text_items") or per_request),
            max_image_items=int(info.get("max_image_items") or per_request),
            identity_source="clip_info",
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ServerError(f"clip_info answered something unreadable: {exc}") from None


def bytes_tensor(items: list[bytes]) -> np.ndarray:
    """list of bytes -> object array shaped (N, 1) for a BYTES input."""
    arr = np.empty((len(items), 1), dtype=object)
    for i, b in enumerate(items):
        arr[i, 0] = b
    return arr


def probe_image() -> bytes:
    """A small deterministic uint8 image (.npy) used to read logit_scale through zero_shot when no config has it."""
    from .inputs import npy_bytes

    rng = np.random.default_rng(0)
    return npy_bytes(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))


def logit_scale_from_zero_shot(out: dict[str, np.ndarray]) -> float:
    """logit_scale = log(logit / cosine) from one zero_shot answer (1 text, 1 image)."""
    cos = float(ops.similarity(out[TEXT_OUT], out[IMAGE_OUT])[0, 0])
    logit = float(out[C.ZeroShot.LOGITS_PER_TEXT][0, 0])
    if abs(cos) < 1e-3 or logit / cos <= 0:
        raise ServerError("cannot infer logit_scale from zero_shot (probe similarity too small)")
    return math.log(logit / cos)


# --------------------------------------------------------------------------------------------- errors


def _status(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    try:
        return str(status() if callable(status) else status or "")
    except Exception:  # noqa: BLE001 - a foreign exception type with an odd status attribute
        return ""


def _message(exc: BaseException) -> str:
    msg = getattr(exc, "message", None)
    try:
        text = msg() if callable(msg) else msg
    except Exception:  # noqa: BLE001
        text = None
    return str(text or exc)


_ITEM_ERROR = re.compile(r"\b(image|text) \d+: ")
# Transient server states: a python stub died (Triton 24.x answers INTERNAL "Stub process ... is not healthy" and
# does not restart it; the supervisor restarts the server), the server is stopping or restarting (while it stops, its
# models unload: NOT_FOUND "'encode_text' has no available versions" / UNAVAILABLE "... is not at ready state").
_TRANSIENT = re.compile(
    r"stub process .*(not healthy|is not alive)|stub process is unhealthy|is not healthy|server is stopping"
    r"|has no available versions|is not at ready state"
    r"|server is shutting down|not accepting new|failed to connect to all addresses|connection refused"
    r"|connection reset|connection closed|socket closed|broken pipe|remote end closed|connection aborted",
    re.IGNORECASE,
)


# A gateway's rate limiting: HTTP 429; over gRPC UNAVAILABLE (Envoy's mapping of 429) or RESOURCE_EXHAUSTED, with a
# message that says so ("rate limited at the gateway ...", Envoy's default "local_rate_limited").
_RATE_LIMITED = re.compile(r"rate.?limit", re.IGNORECASE)
_UNKNOWN_MODEL = re.compile(r"unknown model", re.IGNORECASE)


def map_error(exc: BaseException, what: str) -> CLIPClientError:
    """Any exception raised by tritonclient / the transport -> one of our typed errors (with the answer's status)."""
    if isinstance(exc, CLIPClientError):
        return exc
    err = _typed_error(exc, what, _status(exc), _message(exc))
    err.status = _status(exc)
    return err


def _typed_error(exc: BaseException, what: str, status: str, msg: str) -> CLIPClientError:
    if isinstance(exc, TimeoutError) or status in ("StatusCode.DEADLINE_EXCEEDED", "408", "504") or (
        not status and "failed to obtain inference response" in msg
    ):
        return ServerTimeoutError(f"{what}: timed out" + (f" ({msg})" if msg else ""))
    if status == "429" or (status in ("StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED")
                           and _RATE_LIMITED.search(msg)):
        return RateLimitedError(f"{what}: rate limited: [{status}] {msg}")
    if "is restricted" in msg:  # Triton's restricted APIs answer gRPC UNAVAILABLE / HTTP 403: not transient
        return ServerError(f"{what}: [{status}] {msg} (an admin API: the server restricts it to an admin key)")
    if status in ("StatusCode.UNAVAILABLE", "503", "StatusCode.CANCELLED"):
        # CANCELLED: the server cancels the calls in flight when it stops (a supervised restart); we never cancel ours.
        return ServerUnavailableError(f"{what}: server unavailable: [{status}] {msg}")
    if status in ("StatusCode.INVALID_ARGUMENT", "400", "StatusCode.OUT_OF_RANGE", "413",
                  "StatusCode.RESOURCE_EXHAUSTED"):  # RESOURCE_EXHAUSTED: a message over a size limit
        return InvalidInputError(msg)  # never retried, whatever the message says
    if _TRANSIENT.search(msg) and not _ITEM_ERROR.search(msg):
        return ServerUnavailableError(f"{what}: server unavailable: [{status or type(exc).__name__}] {msg}")
    if status in ("404", "StatusCode.NOT_FOUND") or (status and _UNKNOWN_MODEL.search(msg)):
        return ModelNotFoundError(f"{what}: [{status}] {msg}")
    if status in ("StatusCode.INTERNAL", "500") and _ITEM_ERROR.search(msg) and "internal error" not in msg:
        # The preprocessors reject one item as "image J: <why>" / "text J: <why>"; servers whose Python models
        # do not set TritonError.INVALID_ARG report that as INTERNAL. It is still the caller's input.
        return InvalidInputError(msg)
    if not status and _is_connection_error(exc):
        return ServerUnavailableError(f"{what}: cannot connect: {msg}")
    if status:
        return ServerError(f"{what}: [{status}] {msg}")
    return ServerError(f"{what}: {type(exc).__name__}: {msg}")


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, OSError)):
        return True
    import http.client

    if isinstance(exc, http.client.HTTPException) and type(exc).__name__ in ("HTTPConnectionClosed", "RemoteDisconnected"):
        return True  # geventhttpclient: the server closed the connection (stopping / restarting)
    try:
        import aiohttp

        return isinstance(exc, aiohttp.ClientConnectionError)
    except ImportError:  # pragma: no cover
        return False


def retryable(err: CLIPClientError) -> bool:
    """Only unavailable servers / connection failures and rate limiting are retried; never invalid input or
    timeouts."""
    return isinstance(err, (ServerUnavailableError, RateLimitedError))


def is_restricted(err: CLIPClientError) -> bool:
    """True when the server (or a gateway) refused an API for lack of rights: HTTP 403, gRPC PERMISSION_DENIED, or
    Triton's "... is restricted" answer."""
    return err.status in ("403", "StatusCode.PERMISSION_DENIED") or "is restricted" in str(err)


def backoff_delay(attempt: int, base: float, cap: float = 10.0) -> float:
    """Exponential backoff with full jitter for retry number `attempt` (0-based)."""
    return random.uniform(0.5, 1.0) * min(cap, base * (2**attempt))


def unreachable_message(endpoint: Endpoint, reason: str) -> str:
    """One message for a server that was never reached: the address, the protocol, why, and what to check."""
    names = {"http": "HTTP", "grpc": "gRPC"}
    name = names[endpoint.protocol] + (" with TLS" if endpoint.tls else "")
    port = endpoint.effective_port
    hint = f"Is the server running, and is {port} its {names[endpoint.protocol]} port?"
    other = "grpc" if endpoint.protocol == "http" else "http"
    if port == DEFAULT_PORTS[other]:
        hint += (f" {port} is Triton's default {names[other]} port: use {other}://{endpoint.host}:{port}, or "
                 f"{endpoint.protocol}://{endpoint.host}:{DEFAULT_PORTS[endpoint.protocol]} for {names[endpoint.protocol]}.")
    else:
        hint += " (Triton's defaults: HTTP 8000, gRPC 8001.)"
    if endpoint.tls:
        hint += " Does it serve TLS there, with a certificate this client trusts (ca_file)?"
    return f"cannot reach a Triton server at {endpoint.url} ({name}): {reason.rstrip('. ')}. {hint}"


# ----------------------------------------------------------------------------------- shared client base


@dataclass
class PromptJob:
    """The prompts of one class_embeddings call: which embeddings the cache had, which must be encoded."""

    prompts: list[str]  # class-major: C classes x T templates
    n_classes: int
    n_templates: int
    known: dict[str, np.ndarray] = field(default_factory=dict)  # prompt -> raw embedding, from the cache
    missing: list[str] = field(default_factory=list)  # to encode, de-duplicated, in first-seen order


class ClientBase:
    """Options, model-info cache and prompt-embedding cache shared by CLIPClient and AsyncCLIPClient."""

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
    ):
        try:
            self.endpoint: Endpoint = parse_endpoint(url, protocol)
        except EndpointError as e:
            raise InvalidInputError(str(e)) from None
        if timeout <= 0 or retries < 0 or max_concurrency < 1 or connect_timeout <= 0 or max_download_bytes < 1:
            raise InvalidInputError("timeout and connect_timeout must be > 0, retries >= 0, max_concurrency >= 1, "
                                    "max_download_bytes >= 1")
        if ca_file is not None:
            if not self.endpoint.tls:
                raise InvalidInputError(f"ca_file is for TLS: use an https:// or grpcs:// URL, not {self.endpoint.url}")
            if not Path(ca_file).is_file():
                raise InvalidInputError(f"ca_file {str(ca_file)!r} is not a file")
        self.protocol = self.endpoint.protocol
        self.url = self.endpoint.url  # canonical, scheme included
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
        self._prompt_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._prompt_cache_size = int(prompt_cache_size)
        self._prompt_lock = threading.Lock()  # the cache is shared by threads (CLIPClient) and tasks

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r})"

    # ---- connecting
    def _first_contact_failed(self, exc: BaseException | None) -> None:
        """Before any server answered: raise one clear ServerUnavailableError, no retries. Returns only when `exc`
        is an error status that a server answered (then the address is right and the normal handling applies).
        exc=None: the health probe was answered with "not live"."""
        from tritonclient.utils import InferenceServerException

        proto = {"http": "HTTP", "grpc": "gRPC"}[self.protocol]
        if exc is None:
            reason = "something answers there, but not as a live Triton server (its health/live check said no)"
        elif _status(exc) == "StatusCode.UNIMPLEMENTED":  # Triton's gRPC service has ServerLive: not it (HTTP port?)
            reason = f"something answers there, but not Triton's gRPC service ({_message(exc).splitlines()[0][:200]})"
        else:
            err = map_error(exc, "connect")
            transport = isinstance(err, (ServerUnavailableError, ServerTimeoutError))
            if isinstance(exc, InferenceServerException) and _status(exc) and not transport:
                return  # a status a server answered (e.g. a gateway that rate-limits or refuses the health API)
            if isinstance(err, ServerTimeoutError):
                reason = f"no answer within {self.connect_timeout:g} s"
            elif transport:
                reason = re.sub(r"^connect: (server unavailable: |cannot connect: )?(\[\w+\] )?", "",
                                str(err).split("\n")[0])
            else:  # e.g. an HTTP client at a gRPC port cannot even parse the answer
                reason = f"the answer is not {proto} ({type(exc).__name__}: {str(_message(exc)).splitlines()[0][:200]})"
        raise ServerUnavailableError(unreachable_message(self.endpoint, reason)) from None

    def _log_retry(self, what: str, err: CLIPClientError, attempt: int, delay: float) -> None:
        text = str(err) if str(err).startswith(what) else f"{what}: {err}"
        log.warning("%s; retry %d/%d in %.2f s", text, attempt + 1, self.retries, delay)

    def _first_contact_budget(self, started: float) -> float:
        """Seconds left of connect_timeout for the first contact that began at `started` (time.monotonic()):
        creating the tritonclient (its imports) counts too, so the first failure comes within connect_timeout."""
        return max(0.1, self.connect_timeout - (time.monotonic() - started))

    def _config_refused(self, model: str, err: CLIPClientError) -> CLIPClientError:
        """The error for a model config the server would not give while it has no clip_info model."""
        if not is_restricted(err):
            return err
        return ServerError(
            f"the server at {self.url} has no {CLIP_INFO} model and its model configuration API is restricted "
            f"({err}): the client needs one of them to learn the model's size and limits. Serve a repository "
            "built with clip_info, or pass the admin key in headers (x-clip-admin-key, over gRPC "
            "triton-grpc-protocol-x-clip-admin-key)")

    def _batch_limit(self, info: "ModelInfo", kind: str, batch_size: int | None) -> int:
        """Items per request: the server's limit, capped by max_items and the call's batch_size."""
        n = info.max_text_items if kind == "text" else info.max_image_items
        if self.max_items:
            n = min(n, self.max_items)
        if batch_size is not None:
            if isinstance(batch_size, (bool, np.bool_)) or not isinstance(batch_size, numbers.Integral) \
                    or batch_size < 1:
                raise InvalidInputError(f"batch_size must be a positive int, got {batch_size!r}")
            n = min(n, int(batch_size))
        return n

    @staticmethod
    def _route(kind: str) -> tuple[str, str, str]:
        """(model, input tensor, output tensor) that encode `kind` ("text" or "image")."""
        return (ENCODE_TEXT, TEXT_IN, TEXT_OUT) if kind == "text" else (ENCODE_IMAGE, IMAGE_IN, IMAGE_OUT)

    @staticmethod
    def _embeddings(parts: list[np.ndarray], dim: int, normalize: bool, inputs: Any, kind: str) -> np.ndarray:
        """The answers' parts -> (N, D) float32, L2-normalised if asked; (D,) when the call gave one item."""
        embeds = np.concatenate(parts, axis=0) if parts else np.zeros((0, dim), np.float32)  # (N, D)
        embeds = embeds.astype(np.float32, copy=False)
        if normalize:
            embeds = ops.l2_normalize(embeds)
        return embeds[0] if is_single(inputs, kind) else embeds

    @staticmethod
    def _classified(images: Any, image_embeds: np.ndarray, class_embeds: np.ndarray, labels: list[str],
                    scale: float, top_k: int | None):
        """classify's answer: ranked_labels per image; one list when one image (or one (D,) embedding) came in."""
        rows = ranked_labels(image_embeds, class_embeds, labels, scale, top_k)
        single = image_embeds.ndim == 1 if as_embeddings(images) is not None else is_single(images, "image")
        return rows[0] if single else rows

    def _item_bytes(self, inputs: Any, kind: str):
        """The BYTES items of a call's texts or images, produced lazily (files are read and URLs fetched on demand)."""
        if kind == "text":
            return encode_texts(inputs)
        return encode_images(inputs, max_download_bytes=self.max_download_bytes, download_timeout=self.timeout)

    # ---- requests
    def _infer_options(self) -> dict[str, Any]:
        """tritonclient infer() keywords: headers, and our timeout both as the transport deadline (gRPC) and as the
        request's `timeout` parameter (microseconds), so a request still queued when we give up is dropped by the
        server's queue policy instead of executed for nobody."""
        options: dict[str, Any] = {"headers": self.headers, "timeout": int(self.timeout * 1_000_000)}
        if self.protocol == "grpc":
            options["client_timeout"] = self.timeout
        return options

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

    def _make_outputs(self, names: list[str]) -> list:
        mod = self._module()
        if self.protocol == "http":
            return [mod.InferRequestedOutput(n, binary_data=True) for n in names]
        return [mod.InferRequestedOutput(n) for n in names]

    def _module(self):  # the tritonclient module providing InferInput / InferRequestedOutput
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

    # ---- model info from configs (get_model_info's fallback; the clients only do the I/O)
    def _scale_probe(self, configs: dict[str, dict | None]) -> tuple[str, dict[str, np.ndarray], list[str]] | None:
        """Checks the INFO_CONFIG_MODELS configs; the zero_shot request (model, inputs, outputs) whose answer
        reveals logit_scale when the postprocess config lacks it, else None."""
        if configs[ENCODE_TEXT] is None and configs[ENCODE_IMAGE] is None:
            raise ServerError(f"the server at {self.url} serves neither encode_text nor encode_image")
        post = configs[POSTPROCESS]
        if post is not None and "logit_scale" in (post.get("parameters") or {}):
            return None
        log.warning("postprocess config has no logit_scale; reading it through a zero_shot call")
        return (
            ZERO_SHOT,
            {TEXT_IN: bytes_tensor([b"a photo"]), IMAGE_IN: bytes_tensor([probe_image()])},
            [TEXT_OUT, IMAGE_OUT, C.ZeroShot.LOGITS_PER_TEXT],
        )

    @staticmethod
    def _info_from_configs(configs: dict[str, dict | None], probe_answer: dict[str, np.ndarray] | None) -> ModelInfo:
        """ModelInfo from the configs and, when _scale_probe asked for one, the zero_shot probe's answer."""
        scale = None if probe_answer is None else logit_scale_from_zero_shot(probe_answer)
        return build_model_info(configs, scale)

    # ---- prompt cache (raw, unnormalised text embeddings keyed by prompt)
    def _prompt_job(self, class_texts: Any, templates: str | list[str] | None) -> "PromptJob":
        """The prompts of class_texts x templates, with the embeddings the cache already holds for them."""
        classes = check_classes(class_texts)
        templates = [templates] if isinstance(templates, str) else templates
        prompts = ops.expand_templates(classes, templates)
        known: dict[str, np.ndarray] = {}
        with self._prompt_lock:
            for p in prompts:
                if p not in known and p in self._prompt_cache:
                    known[p] = self._prompt_cache[p]
                    self._prompt_cache.move_to_end(p)  # least recently used goes first
        missing = list(OrderedDict.fromkeys(p for p in prompts if p not in known))  # de-duplicated, first-seen order
        return PromptJob(prompts, len(classes), max(1, len(templates or [])), known, missing)

    def _store_prompts(self, prompts: list[str], embeds: np.ndarray) -> None:
        with self._prompt_lock:
            for p, e in zip(prompts, embeds):
                self._prompt_cache[p] = e
                self._prompt_cache.move_to_end(p)
            while len(self._prompt_cache) > self._prompt_cache_size:
                self._prompt_cache.popitem(last=False)

    def _class_matrix(self, job: "PromptJob", encoded: np.ndarray | None) -> np.ndarray:
        """Normalised class embeddings (C, D) from the job's cached embeddings and `encoded` (job.missing's, raw).

        Built from the job's own embeddings, never read back from the cache: the cache may be smaller than the
        number of prompts, and other threads may evict entries meanwhile.
        """
        embeds = dict(job.known)
        if job.missing:
            if encoded is None or len(encoded) != len(job.missing):
                raise ServerError("encode_text answered a different number of embeddings than prompts sent")
            embeds.update(zip(job.missing, encoded))
            self._store_prompts(job.missing, encoded)
        raw = np.stack([embeds[p] for p in job.prompts])  # (C*T, D)
        return ops.class_embeddings(raw, job.n_classes, job.n_templates)  # (C, D)

    def clear_cache(self) -> None:
        """Forget cached prompt embeddings and the model info (e.g. after the server's model changed)."""
        with self._prompt_lock:
            self._prompt_cache.clear()
        self._info = None


def as_embeddings(x: Any) -> np.ndarray | None:
    """x itself when it is precomputed embeddings (a float array (D,) or (N, D)), else None (texts or images)."""
    if isinstance(x, np.ndarray) and x.dtype.kind == "f" and x.ndim in (1, 2):
        return x
    return None


def is_single(inputs: Any, kind: str) -> bool:
    """True when a call's texts / images are one item (the answer is then one (D,) row)."""
    return is_single_text(inputs) if kind == "text" else is_single_image(inputs)


def progress_bar(inputs: Any, show: bool, kind: str):
    """A tqdm bar over a call's items (total known when `inputs` has a length); a silent one when show is False."""
    from tqdm.auto import tqdm

    total = len(inputs) if hasattr(inputs, "__len__") and not is_single(inputs, kind) else None
    return tqdm(total=total, unit=kind if kind == "text" else "img", desc=f"encode_{kind}", disable=not show)


def ranked_labels(image_embeds: np.ndarray, class_embeds: np.ndarray, labels: list[str], scale: float,
                  top_k: int | None) -> list[list[dict]]:
    """Per image, [{"label", "score"}] sorted by score (softmax over the labels), best first; top_k of them."""
    probs = ops.softmax(ops.similarity(image_embeds, class_embeds, scale), axis=1)  # (I, C)
    idx = ops.topk_indices(probs, len(labels) if top_k is None else top_k)  # (I, k)
    return [[{"label": labels[c], "score": float(row[c])} for c in order] for row, order in zip(probs, idx)]


def classify_result(image_embeds: np.ndarray, class_embeds: np.ndarray, scale: float, return_probabilities: bool):
    """(predictions (I,) int64, probabilities (I, C) float32 or None) from normalised embeddings."""
    logits = ops.similarity(image_embeds, class_embeds, scale)  # (I, C)
    preds = np.argmax(logits, axis=1).astype(np.int64) if len(logits) else np.zeros((0,), np.int64)
    return preds, (ops.softmax(logits, axis=1) if return_probabilities else None)


def check_classes(class_texts: Any) -> list[str]:
    """class_texts -> list[str], non-empty."""
    classes = normalize_texts(class_texts)
    if not classes:
        raise InvalidInputError("class_texts must hold at least one class")
    return classes
