"""Zero-shot head in numpy: normalised embeddings -> scaled logits, softmax over texts, top-k both ways."""

from __future__ import annotations

import numpy as np


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32). (N, D) -> (N, D)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.sqrt(np.einsum("nd,nd->n", x, x, dtype=np.float64)).astype(np.float32)[:, None]  # (N, 1)
    return x / np.maximum(norm, np.float32(eps))


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax (max subtracted) in float32."""
    shifted = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores per row, best first (ties: lower index first). (R, C) -> int64 (R, min(k, C))."""
    rows, cols = scores.shape
    k = max(0, min(int(k), cols))
    if k == 0 or rows == 0:
        return np.zeros((rows, k), dtype=np.int64)
    order = np.argsort(-scores, axis=1, kind="stable")  # (R, C)
    return order[:, :k].astype(np.int64)


def zero_shot(text_embeds: np.ndarray, image_embeds: np.ndarray, logit_scale: float, k: int) -> dict[str, np.ndarray]:
    """The postprocess model's outputs for T texts (T, D) and I images (I, D), as transformers' CLIPModel."""
    t = l2_normalise(text_embeds)  # (T, D)
    i = l2_normalise(image_embeds)  # (I, D)
    scale = np.float32(np.exp(np.float32(logit_scale)))
    logits_per_text = (scale * (t @ i.T)).astype(np.float32)  # (T, I)
    logits_per_image = np.ascontiguousarray(logits_per_text.T)  # (I, T)
    probs = softmax(logits_per_image, axis=1) if logits_per_image.shape[1] else logits_per_image.copy()  # (I, T)
    return {
        "logits_per_image": logits_per_image,
        "logits_per_text": logits_per_text,
        "probs": probs,
        "topk_texts": top_k(logits_per_image, k),  # (I, min(k, T))
        "topk_images": top_k(logits_per_text, k),  # (T, min(k, I))
    }
