"""Embedding math done on the client: CLIP logits, top-k, prompt-template averaging (core: clip_common.ops).

Every helper refuses what would give a confident wrong answer: embeddings that are not finite or have zero norm
(cosine undefined), and a k that is not a positive integer (bools and floats included).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

from clip_common.ops import l2_normalize, logits, softmax, top_k

from .errors import InvalidInputError

__all__ = [
    "as_matrix",
    "check_embeddings",
    "check_k",
    "class_embeddings",
    "expand_templates",
    "l2_normalize",
    "ranked",
    "similarity",
    "softmax",
    "topk_indices",
]


def as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    """A (d,) or (n, d) array of finite numbers -> (n, d) float32."""
    try:
        x = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"{name} must be a float array shaped (n, d) or (d,): {e}") from None
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] == 0:
        raise InvalidInputError(f"{name} must be shaped (n, d) or (d,), got {x.shape}")
    if not np.isfinite(x).all():
        rows = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise InvalidInputError(f"{name} has values that are not finite (NaN or inf) in row(s) {rows[:5].tolist()}")
    return x


def _check_norms(x: np.ndarray, name: str) -> None:
    zero = np.flatnonzero(np.einsum("nd,nd->n", x, x, dtype=np.float64) == 0)
    if zero.size:
        raise InvalidInputError(f"{name} has zero-norm row(s) {zero[:5].tolist()}: their cosine is undefined")


def check_embeddings(x: np.ndarray, name: str) -> np.ndarray:
    """x as (n, d) float32 when every row is finite and of non-zero norm, else an InvalidInputError."""
    x = as_matrix(x, name)
    _check_norms(x, name)
    return x


def similarity(a: np.ndarray, b: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """scale * normalize(a) @ normalize(b).T -> (len(a), len(b)) float32 (CLIP's logits when scale=exp(logit_scale)).

    Raises InvalidInputError for embeddings of different sizes, non-finite values or zero-norm rows.
    """
    a, b = as_matrix(a, "a"), as_matrix(b, "b")
    if a.shape[1] != b.shape[1]:
        raise InvalidInputError(f"embedding sizes differ: {a.shape[1]} vs {b.shape[1]}")
    _check_norms(a, "a")
    _check_norms(b, "b")
    return logits(a, b, scale)


def check_k(k: object, name: str = "top_k") -> int:
    """k as an int >= 1; a bool, a float (1.5 or 2.0), a str or a k < 1 is an InvalidInputError."""
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral):
        raise InvalidInputError(f"{name} must be an int >= 1, got {k!r}")
    if k < 1:
        raise InvalidInputError(f"{name} must be >= 1, got {k}")
    return int(k)


def topk_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores per row, best first; ties keep the lower index first -> (n, min(k, m)) int64."""
    k = check_k(k)
    scores = np.atleast_2d(np.asarray(scores))
    if scores.size and not np.isfinite(scores).all():
        raise InvalidInputError("scores have values that are not finite (NaN or inf)")
    return top_k(scores, k)


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
