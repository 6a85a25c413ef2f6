"""Zero-shot head in numpy: normalised embeddings -> scaled logits, softmax over texts, top-k both ways."""

from __future__ import annotations

import numpy as np

from clip_common import ops


def zero_shot(text_embeds: np.ndarray, image_embeds: np.ndarray, logit_scale: float, k: int) -> dict[str, np.ndarray]:
    """The postprocess model's outputs for T texts (T, D) and I images (I, D), as transformers' CLIPModel."""
    scale = np.float32(np.exp(np.float32(logit_scale)))
    logits_per_text = ops.logits(text_embeds, image_embeds, scale)  # (T, I)
    logits_per_image = np.ascontiguousarray(logits_per_text.T)  # (I, T)
    return {
        "logits_per_image": logits_per_image,
        "logits_per_text": logits_per_text,
        "probs": ops.softmax(logits_per_image, axis=1),  # (I, T)
        "topk_texts": ops.top_k(logits_per_image, k),  # (I, min(k, T))
        "topk_images": ops.top_k(logits_per_text, k),  # (T, min(k, I))
    }
