"""Zero-shot postprocess and the shared embedding math (clip_common.ops) vs a torch reference.

The reference is written like transformers' CLIPModel.forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clip_common.ops import l2_normalize, softmax, top_k
from clip_runtime.postprocess import zero_shot


def torch_reference(text: np.ndarray, image: np.ndarray, logit_scale: float) -> dict[str, np.ndarray]:
    """CLIPModel.forward's math: normalise, exp(logit_scale) * t @ i.T, softmax over texts."""
    t = torch.from_numpy(text)
    i = torch.from_numpy(image)
    t = t / t.norm(p=2, dim=-1, keepdim=True)
    i = i / i.norm(p=2, dim=-1, keepdim=True)
    logits_per_text = torch.matmul(t, i.t()) * torch.tensor(logit_scale).exp()
    logits_per_image = logits_per_text.t()
    return {
        "logits_per_text": logits_per_text.numpy(),
        "logits_per_image": logits_per_image.numpy(),
        "probs": logits_per_image.softmax(dim=1).numpy(),
    }


@pytest.mark.parametrize("t,i,d", [(1, 1, 8), (5, 3, 24), (7, 11, 512), (2, 40, 64)])
def test_matches_torch(t, i, d):
    rng = np.random.default_rng(t * 100 + i)
    text = rng.normal(size=(t, d)).astype(np.float32) * 3
    image = rng.normal(size=(i, d)).astype(np.float32) * 0.2
    out = zero_shot(text, image, 4.6052, k=3)
    ref = torch_reference(text, image, 4.6052)
    for key in ("logits_per_text", "logits_per_image", "probs"):
        assert out[key].dtype == np.float32 and out[key].shape == ref[key].shape
        np.testing.assert_allclose(out[key], ref[key], atol=1e-4, rtol=1e-5)
    assert out["topk_texts"].shape == (i, min(3, t)) and out["topk_texts"].dtype == np.int64
    assert out["topk_images"].shape == (t, min(3, i))
    np.testing.assert_array_equal(out["topk_texts"], np.argsort(-ref["logits_per_image"], axis=1, kind="stable")[:, :3])
    np.testing.assert_array_equal(out["topk_images"], np.argsort(-ref["logits_per_text"], axis=1, kind="stable")[:, :3])
    np.testing.assert_allclose(out["probs"].sum(axis=1), 1.0, atol=1e-5)


def test_k_larger_than_n_is_clamped():
    out = zero_shot(np.eye(3, 4, dtype=np.float32), np.eye(2, 4, dtype=np.float32), 0.0, k=10)
    assert out["topk_texts"].shape == (2, 3)
    assert out["topk_images"].shape == (3, 2)
    assert out["topk_texts"][0, 0] == 0 and out["topk_texts"][1, 0] == 1


def test_softmax_is_stable_for_huge_logits():
    logits = np.array([[1e4, 1e4 - 1, -1e4], [-3e4, -3e4, -3e4]], dtype=np.float32)
    p = softmax(logits, axis=1)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p[0], torch.tensor(logits[0]).softmax(0).numpy(), atol=1e-6)
    np.testing.assert_allclose(p[1], [1 / 3] * 3, atol=1e-6)


def test_top_k_ties_keep_lower_index_first():
    scores = np.array([[0.5, 0.9, 0.9, 0.1]], dtype=np.float32)
    np.testing.assert_array_equal(top_k(scores, 3), [[1, 2, 0]])
    assert top_k(np.zeros((2, 0), np.float32), 5).shape == (2, 0)


def test_l2_normalize_zero_vector_stays_finite():
    x = np.array([[0, 0, 0], [3, 4, 0]], dtype=np.float32)
    y = l2_normalize(x)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y[1], [0.6, 0.8, 0], atol=1e-7)
