"""Embedding math done on the client: normalisation, CLIP logits, softmax, top-k, prompt-template averaging."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import InvalidInputError


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, eps)).astype(np.float32, copy=False)


def as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    """A (d,) or (n, d) float array -> (n, d) float32."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise InvalidInputError(f"{name} must be shaped (n, d) or (d,), got {x.shape}")
    return x


def similarity(a: np.ndarray, b: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """scale * normalize(a) @ normalize(b).T -> (len(a), len(b)) float32 (CLIP's logits when scale=exp(logit_scale))."""
    a, b = as_matrix(a, "a"), as_matrix(b, "b")
    if a.shape[1] != b.shape[1]:
        raise InvalidInputError(f"embedding sizes differ: {a.shape[1]} vs {b.shape[1]}")
    return (np.float32(scale) * (l2_normalize(a) @ l2_normalize(b).T)).astype(np.float32, copy=False)


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax (float32)."""
    z = np.asarray(logits, dtype=np.float32)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32, copy=False)


def topk_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores per row, best first; ties keep the lower index first -> (n, min(k, m)) int64."""
    scores = np.asarray(scores)
    if k < 1:
        raise InvalidInputError(f"top_k must be >= 1, got {k}")
    k = min(k, scores.shape[-1])
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k].astype(np.int64)


def class_embeddings(prompt_embeddings: np.ndarray, n_classes: int, n_templates: int) -> np.ndarray:
    """(C*T, d) prompt embeddings, class-major -> (C, d): normalize each, mean over templates, re-normalize."""
    e = l2_normalize(prompt_embeddings).reshape(n_classes, n_templates, -1)  # (C, T, d)
    return l2_normalize(e.mean(axis=1))  # (C, d)


def expand_templates(class_names: Sequence[str], templates: Sequence[str] | None) -> list[str]:
    """Class names x templates -> prompts, class-major; no templates means the class text itself is the prompt."""
    if not templates:
        return list(class_names)
    for t in templates:
        if not isinstance(t, str) or "{}" not in t:
            raise InvalidInputError(f"each template must be a str containing '{{}}', got {t!r}")
    return [t.replace("{}", c) for c in class_names for t in templates]
