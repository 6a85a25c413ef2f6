"""Model discovery: what the client knows about the served model (ModelInfo), read from the clip_info model's JSON
or, for repositories without it, from the model configs; choosing a named model of a multi-model repository."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import asdict, dataclass

import numpy as np

from clip_common import contract as C

from . import ops
from .errors import InvalidInputError, ModelNotFoundError, ServerError

log = logging.getLogger("clip_client")

ENCODE_TEXT, ENCODE_IMAGE, ZERO_SHOT = C.EncodeText.NAME, C.EncodeImage.NAME, C.ZeroShot.NAME
TEXT_IN, IMAGE_IN = C.EncodeText.TEXT, C.EncodeImage.IMAGE
TEXT_OUT, IMAGE_OUT = C.EncodeText.TEXT_EMBEDS, C.EncodeImage.IMAGE_EMBEDS
MODEL_ID_OUT = "model_id"  # BYTES [1] output of the public ensembles (servers built since issue 20)
TEXT_LIMIT_MODELS = (C.PreprocessText.NAME, C.TextEncoder.NAME)  # configs that bound the items per request
IMAGE_LIMIT_MODELS = (C.PreprocessImage.NAME, C.ImageEncoder.NAME)
POSTPROCESS = C.Postprocess.NAME
CLIP_INFO, CLIP_INFO_OUT = C.ClipInfo.NAME, C.ClipInfo.INFO  # identity + limits as JSON (inference API only)
INFO_CONFIG_MODELS = (POSTPROCESS, ENCODE_TEXT, ENCODE_IMAGE, *TEXT_LIMIT_MODELS, *IMAGE_LIMIT_MODELS)
ITEM_LIMIT_PARAM = "max_items_per_request"  # the preprocessors' parameter
FALLBACK_MAX_ITEMS = 64
MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")  # names of the further models of a repository
SCORINGS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class ModelInfo:
    """What the client knows about the served model, read once from the server."""

    model_id: str  # identity used to tag galleries; from clip_info (or postprocess's `model_id` parameter)
    dim: int  # embedding size D
    logit_scale: float  # raw learned value; logits use exp(logit_scale)
    max_text_items: int  # texts per request
    max_image_items: int  # images per request
    identity_source: str = "postprocess.model_id"  # "clip_info", or "fallback" (derived from configs, weaker)
    scoring: str = "softmax"  # "softmax" (CLIP) or "sigmoid" (SigLIP: sigmoid(scale * cos + logit_bias) per label)
    logit_bias: float | None = None  # SigLIP's learned bias; None for softmax models
    name: str = ""  # the model's name in its repository ("" when the server does not say)
    prefix: str = ""  # prefix of its Triton model names ("" for the repository's first model, else "NAME__")

    @property
    def scale(self) -> float:
        """exp(logit_scale), the multiplier applied to cosine similarities."""
        return math.exp(self.logit_scale)

    def identity(self) -> dict:
        """JSON-able identity stored in gallery metadata."""
        d = asdict(self)
        for key in ("max_text_items", "max_image_items", "scoring", "logit_bias", "name", "prefix"):
            d.pop(key)
        return d

    def scores(self, logits: np.ndarray, axis: int = -1) -> np.ndarray:
        """Per-label probabilities from the model's logits (_results.model_logits: scale * cosine, plus logit_bias
        for a sigmoid model): softmax over `axis`, or for a sigmoid model each logit's own sigmoid (as SigLIP's
        zero-shot pipeline)."""
        if self.scoring == "sigmoid":
            z = np.asarray(logits, dtype=np.float64)
            return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
        return ops.softmax(logits, axis=axis)


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
        blob = json.dumps(
            {
                "dim": dim,
                "logit_scale": round(logit_scale, 6),
                "encoders": [(configs.get(m) or {}).get("name") for m in C.ENCODERS],
            },
            sort_keys=True,
        )
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


def clip_info_json(out: np.ndarray | bytes | str | None) -> dict:
    """The clip_info model's `info` output (JSON, BYTES [1]) -> dict; anything else is a ServerError."""
    if out is None:
        raise ServerError(f"clip_info answered without its {CLIP_INFO_OUT!r} output")
    if isinstance(out, np.ndarray):
        if out.size != 1:
            raise ServerError(f"clip_info answered {out.size} values, not 1")
        out = out.reshape(-1)[0]
    try:
        info = json.loads(out.decode("utf-8") if isinstance(out, (bytes, bytearray, np.bytes_)) else str(out))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ServerError(f"clip_info answered something unreadable: {exc}") from None
    if not isinstance(info, dict):
        raise ServerError("clip_info answered JSON that is not an object")
    return info


def model_info_from_clip_info(out: np.ndarray | bytes | str | dict | None, prefix: str = "") -> ModelInfo:
    """ModelInfo from the clip_info model's `info` output (or its parsed JSON)."""
    info = out if isinstance(out, dict) else clip_info_json(out)
    try:
        per_request = int(info.get("max_items_per_request") or FALLBACK_MAX_ITEMS)
        scoring = str(info.get("scoring") or "softmax")
        if scoring not in SCORINGS:
            raise ValueError(f"unknown scoring {scoring!r}")
        bias = info.get("logit_bias")
        dim = int(info["projection_dim"])
        if dim < 1:
            raise ValueError(f"projection_dim {dim}")
        return ModelInfo(
            model_id=str(info["model_id"]),
            dim=dim,
            logit_scale=float(info["logit_scale"]),
            max_text_items=int(info.get("max_text_items") or per_request),
            max_image_items=int(info.get("max_image_items") or per_request),
            identity_source="clip_info",
            scoring=scoring,
            logit_bias=None if bias is None else float(bias),
            name=str(info.get("name") or ""),
            prefix=prefix,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ServerError(f"clip_info answered something unreadable: {exc}") from None


def check_model_name(model: str | None) -> str | None:
    """CLIPClient(model=...) -> the name, checked (None: the repository's first model)."""
    if model is None:
        return None
    if not isinstance(model, str) or not model:
        raise InvalidInputError(f"model must be a model name (str) or None, got {model!r}")
    return model


def model_prefix(info: dict, model: str) -> str:
    """The Triton-name prefix of model `model`, from the unprefixed clip_info's "models" list."""
    models = info.get("models")
    entries = [m for m in models if isinstance(m, dict)] if isinstance(models, list) else []
    if not entries and model == info.get("name"):
        return ""  # a one-model repository that names its model
    for m in entries:
        if m.get("name") == model:
            prefix = str(m.get("prefix") or "")
            if prefix and not (prefix.endswith("__") and MODEL_NAME.match(prefix[:-2])):
                raise ServerError(f"clip_info lists model {model!r} with an invalid prefix {prefix!r}")
            return prefix
    names = [str(m.get("name")) for m in entries] or ([str(info["name"])] if info.get("name") else [])
    raise ModelNotFoundError(
        f"the server serves no model named {model!r}; it serves: "
        + (", ".join(names) if names else "one unnamed model (use model=None)")
    )


def fallback_identity_probe() -> dict[str, np.ndarray]:
    """Inputs of the zero_shot call whose answer reveals logit_scale when no config has it (1 text, 1 image)."""
    from .inputs import npy_bytes

    rng = np.random.default_rng(0)
    image = npy_bytes(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))
    return {TEXT_IN: bytes_tensor([b"a photo"]), IMAGE_IN: bytes_tensor([image])}


def logit_scale_from_zero_shot(out: dict[str, np.ndarray]) -> float:
    """logit_scale = log(logit / cosine) from one zero_shot answer (1 text, 1 image)."""
    cos = float(ops.similarity(out[TEXT_OUT], out[IMAGE_OUT])[0, 0])
    logit = float(out[C.ZeroShot.LOGITS_PER_TEXT][0, 0])
    if abs(cos) < 1e-3 or logit / cos <= 0:
        raise ServerError("cannot infer logit_scale from zero_shot (probe similarity too small)")
    return math.log(logit / cos)


def bytes_tensor(items: list[bytes]) -> np.ndarray:
    """list of bytes -> object array shaped (N, 1) for a BYTES input."""
    arr = np.empty((len(items), 1), dtype=object)
    for i, b in enumerate(items):
        arr[i, 0] = b
    return arr
