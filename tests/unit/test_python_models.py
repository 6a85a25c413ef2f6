"""The template's Python models with triton_python_backend_utils faked: one vectorised call, per-request errors."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_build.preprocess_plan import plan_preprocessing
from clip_build.repository import generate_configs, template_dir
from clip_common.contract import PreprocessText as PT
from tests.configs import config_json
from tests.unit.fake_triton import FakeTensor as _Tensor


def _load(model: str, manifest: dict, version_dir: Path, configs: dict | None = None, **args):
    spec = importlib.util.spec_from_file_location(f"tpl_{model}", template_dir() / model / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    instance = module.TritonPythonModel()
    config = config_json((configs or generate_configs(manifest))[model])
    instance.initialize(
        {
            "model_config": json.dumps(config),
            "model_repository": str(version_dir.parent),
            "model_version": version_dir.name,
            "model_name": model,
            **args,
        }
    )
    return instance


def _png(h, w, seed=0):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _bytes_req(name, items):
    return {name: _Tensor(name, np.array([[x] for x in items], dtype=object))}


def test_preprocess_image_isolates_bad_request_and_normalises_in_the_pool(pb, manifest, tmp_path, monkeypatch):
    model = _load("preprocess_image", manifest, tmp_path / "1")
    assert model.gpu is None  # image_decode=cpu: the exact path, no torch
    threads = []
    original = model.pre.pixels
    monkeypatch.setattr(model.pre, "pixels", lambda a: threads.append(threading.current_thread().name) or original(a))
    images = [_png(40, 50), _png(60, 30, 1), _png(40, 40), _png(33, 70, 2)]
    requests = [
        _bytes_req("IMAGE", images[:2]),
        _bytes_req("IMAGE", [images[2], b"garbage"]),
        _bytes_req("IMAGE", images[3:]),
    ]
    out = model.execute(requests)
    s = model.pre.cfg.output_size
    assert out[0].error is None and out[0].outputs["PIXEL_VALUES"].shape == (2, 3, s, s)
    assert out[1].error is not None and out[1].error.message.startswith("image 1: not a decodable image")
    assert out[1].error.code == "INVALID_ARG"
    assert out[2].error is None and out[2].outputs["PIXEL_VALUES"].shape == (1, 3, s, s)
    assert len(threads) == 4 and all(name.startswith("decode") for name in threads)  # each good item, in the pool
    exact = model.pre.normalise(np.stack([model.pre.load(b) for b in images]))  # (4, 3, S, S): one batched lookup
    assert np.array_equal(
        np.concatenate([out[0].outputs["PIXEL_VALUES"], out[2].outputs["PIXEL_VALUES"]]), exact[[0, 1, 3]]
    )
    solo = model.execute([_bytes_req("IMAGE", images[3:])])[0]
    assert np.array_equal(solo.outputs["PIXEL_VALUES"], out[2].outputs["PIXEL_VALUES"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the load failure where there is no GPU decoding")
def test_preprocess_image_gpu_decode_fails_the_load_clearly(pb, manifest, tmp_path):
    """--image-decode gpu where torchvision (CI) or CUDA is missing: the model load fails saying so, no CPU fallback."""
    configs = generate_configs(manifest, instance_kind="gpu", preprocess=plan_preprocessing("gpu", "gpu", cores=4))
    with pytest.raises(
        pb.TritonModelException,
        match=r"^preprocess_image: image_decode=gpu cannot run here: "
        r"(ModuleNotFoundError: No module named 'torchvision'|GpuDecodeUnavailable: .*sees 0 CUDA).*"
        r"torch with CUDA and torchvision .* --image-decode cpu$",
    ):
        _load(
            "preprocess_image",
            manifest,
            tmp_path / "1",
            configs,
            model_instance_kind="GPU",
            model_instance_device_id="0",
        )


def test_preprocess_text_rows_lengths_and_widths(pb, manifest, tokenizer_json, tmp_path):
    """One tokenisation per execute, padded to its longest text (no bucket rounding); each row says its token count,
    so the encoder can batch rows of any length."""
    version = tmp_path / "1"
    version.mkdir()
    shutil.copy(tokenizer_json, version / "tokenizer.json")
    model = _load("preprocess_text", manifest, version)
    long = "a much longer sentence with quite a few more words in it"
    requests = [
        _bytes_req("TEXT", [b"a cat"]),
        _bytes_req("TEXT", [b"ok", b"\xc3\x28 bad"]),
        _bytes_req("TEXT", [long.encode()] * 2),
    ]
    out = model.execute(requests)
    assert out[1].error.message.startswith("text 1: ")
    # the widths come from Triton (BATCH_ITEM_SHAPE); TOKEN_COUNTS and MODEL_ID go to encode_text's answer
    assert set(out[0].outputs) == {PT.INPUT_IDS, PT.LENGTHS, PT.TOKEN_COUNTS, PT.MODEL_ID}
    (ids0, len0), (ids2, len2) = ([out[r].outputs[n] for n in (PT.INPUT_IDS, PT.LENGTHS)] for r in (0, 2))
    assert ids0.dtype == len0.dtype == np.int64
    assert len0.tolist() == [[4]] and len2.tolist() == [[14], [14]]  # [CLS] a cat [SEP]; the long one
    assert ids0.shape == (1, 14) and ids2.shape == (2, 14)
    assert (ids0[0, 4:] == manifest["tokenizer"]["pad_token_id"]).all()
    alone = model.execute([_bytes_req("TEXT", [b"a cat"])])[0].outputs
    assert alone[PT.INPUT_IDS].tolist() == ids0[:, :4].tolist()


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
    too_many = [
        {"TEXT_EMBEDS": _Tensor("TEXT_EMBEDS", rows), "IMAGE_EMBEDS": _Tensor("IMAGE_EMBEDS", rows[:1])},
        {"TEXT_EMBEDS": _Tensor("TEXT_EMBEDS", rows[:1]), "IMAGE_EMBEDS": _Tensor("IMAGE_EMBEDS", rows)},
    ]
    out = model.execute(too_many)
    assert out[0].error.message == f"{n + 1} text embeddings in one request, more than the limit of {n}"
    assert out[1].error.message == f"{n + 1} image embeddings in one request, more than the limit of {n}"
    assert all(o.error.code == "INVALID_ARG" for o in out) and not computed
