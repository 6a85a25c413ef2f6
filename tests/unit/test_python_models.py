"""The template's Python models with triton_python_backend_utils faked: one vectorised call, per-request errors."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from clip_build.repository import generate_configs, template_dir
from tests.configs import config_json
from tests.unit.fake_triton import FakeTensor as _Tensor


def _load(model: str, manifest: dict, version_dir: Path):
    spec = importlib.util.spec_from_file_location(f"tpl_{model}", template_dir() / model / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    instance = module.TritonPythonModel()
    config = config_json(generate_configs(manifest)[model])
    instance.initialize({"model_config": json.dumps(config), "model_repository": str(version_dir.parent),
                         "model_version": version_dir.name, "model_name": model})
    return instance


def _png(h, w, seed=0):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _bytes_req(name, items):
    return {name: _Tensor(name, np.array([[x] for x in items], dtype=object))}


def test_preprocess_image_isolates_bad_request_and_normalises_once(pb, manifest, tmp_path, monkeypatch):
    model = _load("preprocess_image", manifest, tmp_path / "1")
    calls = []
    original = model.pre.normalise
    monkeypatch.setattr(model.pre, "normalise", lambda batch: calls.append(batch.shape) or original(batch))
    requests = [_bytes_req("IMAGE", [_png(40, 50), _png(60, 30, 1)]),
                _bytes_req("IMAGE", [_png(40, 40), b"garbage"]),
                _bytes_req("IMAGE", [_png(33, 70, 2)])]
    out = model.execute(requests)
    s = model.pre.cfg.output_size
    assert out[0].error is None and out[0].outputs["PIXEL_VALUES"].shape == (2, 3, s, s)
    assert out[1].error is not None and out[1].error.message.startswith("image 1: not a decodable image")
    assert out[1].error.code == "INVALID_ARG"
    assert out[2].error is None and out[2].outputs["PIXEL_VALUES"].shape == (1, 3, s, s)
    assert calls == [(3, s, s, 3)]  # one vectorised normalise for the whole execute
    solo = model.execute([_bytes_req("IMAGE", [_png(33, 70, 2)])])[0]
    assert np.array_equal(solo.outputs["PIXEL_VALUES"], out[2].outputs["PIXEL_VALUES"])


def test_preprocess_text_one_length_per_execute(pb, manifest, tokenizer_json, tmp_path):
    version = tmp_path / "1"
    version.mkdir()
    shutil.copy(tokenizer_json, version / "tokenizer.json")
    model = _load("preprocess_text", manifest, version)
    requests = [_bytes_req("TEXT", [b"a cat"]), _bytes_req("TEXT", [b"ok", b"\xc3\x28 bad"]),
                _bytes_req("TEXT", ["a much longer sentence with quite a few more words in it".encode()] * 2)]
    out = model.execute(requests)
    assert out[1].error.message.startswith("text 1: ")
    ids0, ids2 = out[0].outputs["INPUT_IDS"], out[2].outputs["INPUT_IDS"]
    assert ids0.shape[1] == ids2.shape[1] and ids0.shape[1] % 16 == 0
    assert ids0.dtype == np.int64 and out[0].outputs["ATTENTION_MASK"][0].sum() < out[2].outputs["ATTENTION_MASK"][0].sum()


def test_postprocess_default_top_k_and_bad_k(pb, manifest, tmp_path):
    model = _load("postprocess", manifest, tmp_path / "1")
    d = manifest["projection_dim"]
    rng = np.random.default_rng(0)
    t, i = rng.normal(size=(7, d)).astype(np.float32), rng.normal(size=(2, d)).astype(np.float32)
    req = {"TEXT_EMBEDS": _Tensor("TEXT_EMBEDS", t), "IMAGE_EMBEDS": _Tensor("IMAGE_EMBEDS", i)}
    bad = {**req, "TOP_K": _Tensor("TOP_K", np.array([0], np.int32))}
    ok, err = model.execute([req, bad])
    assert ok.outputs["TOPK_TEXTS"].shape == (2, 5) and ok.outputs["TOPK_IMAGES"].shape == (7, 2)
    assert np.array_equal(ok.outputs["TEXT_EMBEDS_OUT"], t)
    assert err.error.message == "top_k must be >= 1, got 0"


def test_postprocess_refuses_too_many_embeddings_before_computing(pb, manifest, tmp_path, monkeypatch):
    """T x I work: at most max_items_per_request text and image embeddings each (an internal model, reachable)."""
    model = _load("postprocess", manifest, tmp_path / "1")
    computed = []
    monkeypatch.setitem(type(model)._one.__globals__, "zero_shot", lambda *a: computed.append(a) or {})
    d, n = manifest["projection_dim"], model.max_items
    rows = np.zeros((n + 1, d), np.float32)
    too_many = [{"TEXT_EMBEDS": _Tensor("TEXT_EMBEDS", rows), "IMAGE_EMBEDS": _Tensor("IMAGE_EMBEDS", rows[:1])},
                {"TEXT_EMBEDS": _Tensor("TEXT_EMBEDS", rows[:1]), "IMAGE_EMBEDS": _Tensor("IMAGE_EMBEDS", rows)}]
    out = model.execute(too_many)
    assert out[0].error.message == f"{n + 1} text embeddings in one request, more than the limit of {n}"
    assert out[1].error.message == f"{n + 1} image embeddings in one request, more than the limit of {n}"
    assert all(o.error.code == "INVALID_ARG" for o in out) and not computed
