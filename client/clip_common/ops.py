"""Embedding math shared by the server's postprocess model and the client: normalise, logits, softmax, top-k."""

from __future__ import annotations

import numpy as np


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32, norms accumulated in float64); zero rows stay zero.

    (..., D) -> (..., D)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.sqrt(np.einsum("...d,...d->...", x, x, dtype=np.float64)).astype(np.float32)[..., None]  # (..., 1)
    return x / np.maximum(norm, np.float32(eps))


def logits(text_embeds: np.ndarray, image_embeds: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """scale * normalize(text) @ normalize(image).T -> (T, I) float32.

    CLIP's logits_per_text when scale=exp(logit_scale)."""
    t, i = l2_normalize(text_embeds), l2_normalize(image_embeds)  # (T, D), (I, D)
    return (np.float32(scale) * (t @ i.T)).astype(np.float32, copy=False)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax (max subtracted) in float32."""
    z = np.asarray(x, dtype=np.float32)
    if z.size == 0:
        return z.copy()
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32, copy=False)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores per row, best first (ties: lower index first). (R, C) -> int64 (R, min(k, C))."""
    scores = np.asarray(scores)
    rows, cols = scores.shape
    k = max(0, min(int(k), cols))
    if k == 0 or rows == 0:
        return np.zeros((rows, k), dtype=np.int64)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.int64)
