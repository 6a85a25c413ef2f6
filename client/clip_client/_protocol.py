"""Sans-I/O requests and answers: what each call sends (model, input tensors) and how each answer is checked.

Nothing here touches the network: the transports (client.py, aio.py) send a Request and hand the outputs back to
Request.check. Every answer is checked against the contract before anything is returned to the caller: outputs
present, one row per input, the model's embedding size, finite values, and the answering model's identity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clip_common import contract as C

from ._info import (
    CLIP_INFO,
    CLIP_INFO_OUT,
    ENCODE_IMAGE,
    ENCODE_TEXT,
    IMAGE_IN,
    IMAGE_OUT,
    MODEL_ID_OUT,
    TEXT_IN,
    TEXT_OUT,
    ZERO_SHOT,
    bytes_tensor,
)
from .errors import InvalidResponseError, ModelChangedError

Outputs = dict[str, Any]  # output name -> numpy array (None when the answer lacks it)


@dataclass(frozen=True)
class Request:
    """One inference request: the Triton model (prefix included), its inputs, the outputs the answer must hold,
    and the check that turns the answer into the call's value."""

    model: str
    inputs: dict[str, np.ndarray]
    outputs: tuple[str, ...]
    check: Callable[[Outputs, str], Any] = field(default=lambda out, url: out)  # (outputs, server url) -> value

    @property
    def what(self) -> str:
        return f"infer {self.model}"


def require_outputs(out: Outputs, names: tuple[str, ...], model: str, url: str) -> None:
    """InvalidResponseError unless every output of `names` is in the answer."""
    missing = [n for n in names if out.get(n) is None]
    if missing:
        got = sorted(k for k, v in out.items() if v is not None)
        raise _bad(f"{model} answered without output(s) {missing} (it sent {got})", url)


def check_embeddings(out: Outputs, name: str, rows: int, dim: int, model: str, url: str) -> np.ndarray:
    """The (rows, dim) float32 embeddings of output `name`, or InvalidResponseError naming what is wrong."""
    require_outputs(out, (name,), model, url)
    e = out[name]
    if not isinstance(e, np.ndarray) or e.dtype.kind != "f":
        raise _bad(f"{model} answered {name} as {getattr(e, 'dtype', type(e).__name__)}, not floats", url)
    if e.ndim != 2 or e.shape[0] != rows:
        raise _bad(
            f"{model} answered {name} shaped {tuple(e.shape)} for {rows} input(s): one row per input was expected", url
        )
    if e.shape[1] != dim:
        raise _bad(f"{model} answered {e.shape[1]}-dimensional {name}; the model's size is {dim}", url)
    if not np.isfinite(e).all():
        bad = np.flatnonzero(~np.isfinite(e).all(axis=1))
        raise _bad(
            f"{model} answered {name} with values that are not finite (NaN or inf) in row(s) {bad[:5].tolist()}", url
        )
    return e.astype(np.float32, copy=False)


def answered_model_id(out: Outputs, model: str, url: str) -> str | None:
    """The `model_id` output of an answer, or None when the server has no such output (servers before issue 20)."""
    v = out.get(MODEL_ID_OUT)
    if v is None:
        return None
    try:
        item = np.asarray(v).reshape(-1)[0]
        return item.decode("utf-8") if isinstance(item, (bytes, bytearray, np.bytes_)) else str(item)
    except (IndexError, UnicodeDecodeError) as e:
        raise _bad(f"{model} answered an unreadable {MODEL_ID_OUT} output ({e})", url) from None


def check_identity(out: Outputs, expected: str | None, model: str, url: str) -> None:
    """ModelChangedError when the answer's model_id is not the one the client read from clip_info."""
    got = answered_model_id(out, model, url)
    if got is not None and expected is not None and got != expected:
        err = ModelChangedError(
            f"the server at {url} now serves model {got} on {model}, not the model {expected} "
            "this client had read; cached prompt embeddings and model info were dropped: call "
            "again"
        )
        err.url = url
        raise err


def _bad(message: str, url: str) -> InvalidResponseError:
    err = InvalidResponseError(f"invalid answer from {url}: {message}")
    err.url = url
    return err


# ----------------------------------------------------------------------------------- the requests


def clip_info_request(prefix: str) -> Request:
    """The clip_info model of the model with this Triton-name prefix."""
    return Request(
        prefix + CLIP_INFO,
        {},
        (CLIP_INFO_OUT,),
        lambda out, url: (require_outputs(out, (CLIP_INFO_OUT,), prefix + CLIP_INFO, url), out[CLIP_INFO_OUT])[1],
    )


def embed_request(prefix: str, kind: str, items: list[bytes], dim: int) -> Request:
    """encode_text / encode_image of `items`; the answer is checked to (len(items), dim) finite float32."""
    model, name, out_name = (ENCODE_TEXT, TEXT_IN, TEXT_OUT) if kind == "text" else (ENCODE_IMAGE, IMAGE_IN, IMAGE_OUT)
    model = prefix + model
    return Request(
        model,
        {name: bytes_tensor(items)},
        (out_name,),
        lambda out, url: check_embeddings(out, out_name, len(items), dim, model, url),
    )


def zero_shot_request(prefix: str, texts: list[bytes], images: list[bytes], top_k: int, dim: int) -> Request:
    """zero_shot of T texts and I images; every output is checked for presence and shape."""
    model = prefix + ZERO_SHOT
    Z = C.ZeroShot

    def check(out: Outputs, url: str) -> dict[str, np.ndarray]:
        require_outputs(out, Z.OUTPUTS, model, url)
        t, i = len(texts), len(images)
        check_embeddings(out, Z.TEXT_EMBEDS, t, dim, model, url)
        check_embeddings(out, Z.IMAGE_EMBEDS, i, dim, model, url)
        for name, shape in ((Z.LOGITS_PER_IMAGE, (i, t)), (Z.LOGITS_PER_TEXT, (t, i)), (Z.PROBS, (i, t))):
            if tuple(out[name].shape) != shape or not np.isfinite(out[name]).all():
                raise _bad(f"{model} answered {name} shaped {tuple(out[name].shape)} (expected {shape}, finite)", url)
        for name, rows, cols in ((Z.TOPK_TEXTS, i, t), (Z.TOPK_IMAGES, t, i)):
            k = out[name]
            if k.ndim != 2 or k.shape[0] != rows or k.shape[1] > cols or (k.size and (k.min() < 0 or k.max() >= cols)):
                raise _bad(f"{model} answered {name} shaped {tuple(k.shape)} with indices outside 0..{cols - 1}", url)
        return {n: out[n] for n in Z.OUTPUTS}

    return Request(
        model,
        {Z.TEXT: bytes_tensor(texts), Z.IMAGE: bytes_tensor(images), Z.TOP_K: np.array([top_k], dtype=np.int32)},
        Z.OUTPUTS,
        check,
    )


def probe_request(prefix: str, inputs: dict[str, np.ndarray]) -> Request:
    """The zero_shot probe that reveals logit_scale (repositories without clip_info and without the parameter)."""
    outs = (TEXT_OUT, IMAGE_OUT, C.ZeroShot.LOGITS_PER_TEXT)
    return Request(
        prefix + ZERO_SHOT, inputs, outs, lambda out, url: (require_outputs(out, outs, prefix + ZERO_SHOT, url), out)[1]
    )
