"""Embedding math done on the client: CLIP logits, top-k, prompt-template averaging (the shared core is clip_common.ops)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clip_common.ops import l2_normalize, logits, softmax, top_k

from .errors import InvalidInputError

__all__ = ["as_matrix", "class_embeddings", "expand_templates", "l2_normalize", "ranked", "similarity", "softmax",
           "topk_indices"]


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
    return logits(a, b, scale)


def topk_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores per row, best first; ties keep the lower index first -> (n, min(k, m)) int64."""
    if k < 1:
        raise InvalidInputError(f"top_k must be >= 1, got {k}")
    return top_k(np.atleast_2d(np.asarray(scores)), k)


def ranked(scores: np.ndarray, k: int, return_scores: bool = False):
    """topk_indices of scores (n, m), and with return_scores also the scores they point at -> (indices, scores)."""
    idx = topk_indices(scores, k)
    return (idx, np.take_along_axis(scores, idx, axis=1)) if return_scores else idx


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
