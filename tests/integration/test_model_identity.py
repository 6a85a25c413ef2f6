"""Model identity on every public answer (model_id outputs), encode_text's token_counts, and clip_info's identity
fields, against the session's real Triton server."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from clip_common.contract import ClipInfo, EncodeImage, EncodeText, ZeroShot
from tests.integration.triton_helpers import infer, small_png

PROTOCOLS = ("http", "grpc")
TEXTS = ["a photo of a cat", "", "a much longer description of a scene with many words in it, " * 8]


def _client(handle, protocol: str):
    if protocol == "http":
        return httpclient.InferenceServerClient(handle.http_url, network_timeout=120)
    return grpcclient.InferenceServerClient(handle.grpc_url)


def _texts(items: list[str]) -> np.ndarray:
    return np.array([[t.encode()] for t in items], dtype=object)  # [N, 1]


def _info(handle) -> dict:
    client = _client(handle, "http")
    out = infer(client, "http", ClipInfo.NAME, {}, [ClipInfo.INFO])[ClipInfo.INFO]
    return json.loads(out.reshape(-1)[0])


@pytest.fixture(scope="module")
def manifest(triton_server) -> dict:
    return json.loads((triton_server.weights_dir / "manifest.json").read_text())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_encode_text_answers_model_id_and_token_counts(triton_server, manifest, protocol):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(triton_server.checkpoint_dir))
    want = [len(ids) for ids in tok(TEXTS, truncation=True, max_length=77)["input_ids"]]
    out = infer(
        _client(triton_server, protocol),
        protocol,
        EncodeText.NAME,
        {EncodeText.TEXT: _texts(TEXTS)},
        [EncodeText.MODEL_ID, EncodeText.TOKEN_COUNTS],
    )
    got = (
        out[EncodeText.MODEL_ID].reshape(-1).tolist(),
        out[EncodeText.TOKEN_COUNTS].dtype,
        out[EncodeText.TOKEN_COUNTS].tolist(),
    )
    assert got == ([manifest["model_id"].encode()], np.dtype(np.int32), want)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_encode_image_answers_model_id(triton_server, manifest, protocol):
    images = np.array([[small_png(1)], [small_png(2)]], dtype=object)
    out = infer(
        _client(triton_server, protocol),
        protocol,
        EncodeImage.NAME,
        {EncodeImage.IMAGE: images},
        [EncodeImage.MODEL_ID, EncodeImage.IMAGE_EMBEDS],
    )
    assert (out[EncodeImage.MODEL_ID].tolist(), out[EncodeImage.IMAGE_EMBEDS].shape[0]) == (
        [manifest["model_id"].encode()],
        2,
    )


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_zero_shot_answers_model_id(triton_server, manifest, protocol):
    inputs = {ZeroShot.TEXT: _texts(["a", "b", "c"]), ZeroShot.IMAGE: np.array([[small_png(3)]], dtype=object)}
    out = infer(_client(triton_server, protocol), protocol, ZeroShot.NAME, inputs, [ZeroShot.MODEL_ID, ZeroShot.PROBS])
    assert (out[ZeroShot.MODEL_ID].tolist(), out[ZeroShot.PROBS].shape) == ([manifest["model_id"].encode()], (1, 3))


def test_clip_info_names_the_model_its_scoring_and_source(triton_server, manifest):
    info = _info(triton_server)
    entry = {
        "name": info["name"],
        "prefix": "",
        "model_id": manifest["model_id"],
        "family": "clip",
        "scoring": "softmax",
        "source": triton_server.checkpoint_dir.name,
        "dim": manifest["projection_dim"],
    }
    got = {k: info.get(k) for k in ("scoring", "logit_bias", "source", "models")}
    assert got == {
        "scoring": "softmax",
        "logit_bias": None,
        "source": triton_server.checkpoint_dir.name,
        "models": [entry],
    }
