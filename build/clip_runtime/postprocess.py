"""Zero-shot head in numpy: normalised embeddings -> scaled logits, probabilities, top-k both ways.

softmax scoring (CLIP): probs = softmax over the texts of exp(logit_scale) * cos. sigmoid scoring (SigLIP): each
label's own probability sigmoid(exp(logit_scale) * cos + logit_bias), as transformers' zero-shot pipeline gives it.
"""

from __future__ import annotations

import numpy as np

from clip_common import ops


def zero_shot(
    text_embeds: np.ndarray,
    image_embeds: np.ndarray,
    logit_scale: float,
    k: int,
    *,
    logit_bias: float = 0.0,
    scoring: str = "softmax",
) -> dict[str, np.ndarray]:
    """The postprocess model's outputs for T texts (T, D) and I images (I, D), as CLIPModel / SiglipModel give them."""
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"unknown scoring {scoring!r} (softmax or sigmoid)")
    scale = np.float32(np.exp(np.float32(logit_scale)))
    logits_per_text = ops.logits(text_embeds, image_embeds, scale)  # (T, I)
    if logit_bias:
        logits_per_text = logits_per_text + np.float32(logit_bias)
    logits_per_image = np.ascontiguousarray(logits_per_text.T)  # (I, T)
    if scoring == "sigmoid":
        probs = (1.0 / (1.0 + np.exp(-logits_per_image.astype(np.float64)))).astype(np.float32)  # (I, T)
    else:
        probs = ops.softmax(logits_per_image, axis=1)  # (I, T)
    return {
        "logits_per_image": logits_per_image,
        "logits_per_text": logits_per_text,
        "probs": probs,
        "topk_texts": ops.top_k(logits_per_image, k),  # (I, min(k, T))
        "topk_images": ops.top_k(logits_per_text, k),  # (T, min(k, I))
    }
