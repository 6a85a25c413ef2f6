"""Several models in one server, through the client: model= picks one by name, each answer's model_id is checked,
and a sigmoid (SigLIP) model's client-side scores are the server's own zero_shot probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from clip_client import CLIPClient, ModelNotFoundError
from tests.integration.client_helpers import make_client
from tests.integration.triton_helpers import serving

LABELS = ["a cat", "a dog", "a red car", "a rocket"]


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, weights):
    """A repository serving SigLIP first (plain names) and the tiny CLIP as "clip" (names prefixed "clip__")."""
    from clip_build.repository import BuildOptions, build_repositories

    tmp = tmp_path_factory.mktemp("two-models")
    repo = build_repositories(
        [("siglip", weights("siglip")), ("clip", weights("clip"))], tmp / "repo", BuildOptions(max_queue_delay_us=500)
    )
    with serving(repo, log_path=tmp / "tritonserver.log", exit_timeout=3) as server:
        yield server


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, size=(n, 40, 56, 3), dtype=np.uint8)


@pytest.mark.parametrize("protocol,mode", [("grpc", "sync"), ("http", "async")])
def test_model_selects_each_model_by_name(two_models, protocol, mode):
    url = two_models.grpc_url if protocol == "grpc" else two_models.http_url
    first, clip = make_client(f"{protocol}://{url}", mode), make_client(f"{protocol}://{url}", mode, model="clip")
    try:
        a, b = first.get_model_info(), clip.get_model_info()
        assert (a.prefix, a.scoring, b.prefix, b.scoring) == ("", "sigmoid", "clip__", "softmax")
        assert a.model_id != b.model_id and b.name == "clip"
        assert clip.encode_text(LABELS).shape == (4, b.dim) and first.encode_text(LABELS).shape == (4, a.dim)
        assert clip.encode_image(_images(2)).shape == (2, b.dim)
    finally:
        first.close()
        clip.close()
    with CLIPClient(f"{protocol}://{url}", model="nope") as c, pytest.raises(ModelNotFoundError) as err:
        c.get_model_info()
    assert "siglip" in str(err.value) and "clip" in str(err.value)


def test_sigmoid_model_scores_are_the_servers_zero_shot_probabilities(two_models):
    """classify / zero_shot_classification of a "scoring": "sigmoid" model (bare labels): per-label
    sigmoid(scale * cos + logit_bias), the same numbers as the zero_shot ensemble's probs (not a softmax)."""
    images = _images(3)
    with CLIPClient(two_models.grpc_url) as c:
        info = c.get_model_info()
        assert info.scoring == "sigmoid" and info.logit_bias is not None
        server = c.zero_shot(images, LABELS, top_k=4)["probs"]  # (I, T)
        _, probs = c.zero_shot_classification(images, LABELS)
        rows = c.classify(images, LABELS, templates=["{}"])
    np.testing.assert_allclose(probs, server, atol=1e-4)
    assert not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3)  # per label, not a softmax over the labels
    for row, p in zip(rows, server):
        assert {x["label"]: x["score"] for x in row} == pytest.approx(dict(zip(LABELS, p.tolist())), abs=1e-4)
