"""Shaping answers into what the public methods return: embeddings (D,) or (N, D), ranked labels, predictions;
and the progress bar over a call's items."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import ops
from ._info import ModelInfo
from .inputs import is_single_image, is_single_text


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


def embeddings(parts: list[np.ndarray], dim: int, normalize: bool, single: bool) -> np.ndarray:
    """The answers' parts -> (N, D) float32, L2-normalised if asked; (D,) when the call gave one item."""
    embeds = np.concatenate(parts, axis=0) if parts else np.zeros((0, dim), np.float32)  # (N, D)
    embeds = embeds.astype(np.float32, copy=False)
    if normalize:
        embeds = ops.l2_normalize(embeds)
    return embeds[0] if single else embeds


def model_logits(info: ModelInfo, cosine: np.ndarray) -> np.ndarray:
    """The model's logits from cosine similarities: exp(logit_scale) * cos, plus logit_bias for sigmoid models."""
    z = np.float32(info.scale) * cosine
    if info.scoring == "sigmoid" and info.logit_bias is not None:
        z = z + np.float32(info.logit_bias)
    return z.astype(np.float32, copy=False)


def ranked_labels(
    image_embeds: np.ndarray, class_embeds: np.ndarray, labels: list[str], info: ModelInfo, top_k: int | None
) -> list[list[dict]]:
    """Per image, [{"label", "score"}] sorted by score, best first; top_k of them. Scores: softmax over the labels,
    or per label sigmoid(logits) for a sigmoid ("scoring": "sigmoid") model."""
    probs = info.scores(model_logits(info, ops.similarity(image_embeds, class_embeds)), axis=1)  # (I, C)
    idx = ops.topk_indices(probs, len(labels) if top_k is None else top_k)  # (I, k)
    return [[{"label": labels[c], "score": float(row[c])} for c in order] for row, order in zip(probs, idx)]


def classify_result(image_embeds: np.ndarray, class_embeds: np.ndarray, info: ModelInfo, return_probabilities: bool):
    """(predictions (I,) int64, probabilities (I, C) float32 or None) from normalised embeddings."""
    logits = model_logits(info, ops.similarity(image_embeds, class_embeds))  # (I, C)
    preds = np.argmax(logits, axis=1).astype(np.int64) if len(logits) else np.zeros((0,), np.int64)
    return preds, (info.scores(logits, axis=1) if return_probabilities else None)
