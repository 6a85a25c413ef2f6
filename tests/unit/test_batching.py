"""The one execute loop (clip_runtime.batching) and the Python-based pytorch runner that uses it, Triton faked."""

from __future__ import annotations

import importlib.util
import json
import warnings

import numpy as np
import pytest
import torch

from clip_runtime.batching import execute_batched, execute_each, request_items
from clip_runtime.errors import InvalidInputError
from clip_server.backend_dir import RUNNER_SOURCE
from tests.unit.fake_triton import FakeLogger, FakeTensor


def _req(**arrays):
    return {k: FakeTensor(k, v) for k, v in arrays.items()}


def test_one_compute_per_execute_and_outputs_split_back(pb):
    calls = []

    def compute(items):
        calls.append(list(items))
        return {"OUT": np.array(items, dtype=np.int64) * 10}

    requests = [_req(X=np.array([[1], [2]])), _req(X=np.array([[3]])), _req(X=np.array([[4], [5], [6]]))]
    out = execute_batched(pb, requests, read=lambda r: list(r["X"].as_numpy().reshape(-1)), compute=compute)
    assert calls == [[1, 2, 3, 4, 5, 6]]
    assert [o.outputs["OUT"].tolist() for o in out] == [[10, 20], [30], [40, 50, 60]]


def test_a_bad_item_fails_its_own_request_only(pb):
    def prepare(items):
        return [InvalidInputError("no sevens") if x == 7 else x for x in items]

    requests = [_req(X=np.array([1, 7, 2])), _req(X=np.array([3])), _req(X=np.array([7]))]
    seen = []
    out = execute_batched(pb, requests, read=lambda r: list(r["X"].as_numpy()), prepare=prepare,
                          compute=lambda good: seen.append(good) or {"OUT": np.array(good)}, label="thing")
    assert out[0].error.message == "thing 1: no sevens" and out[0].error.code == "INVALID_ARG"
    assert out[2].error.message == "thing 0: no sevens"
    assert out[1].error is None and out[1].outputs["OUT"].tolist() == [3]
    assert seen == [[3]]  # the failed requests' good items are not computed


def test_read_errors_and_internal_faults(pb):
    def read(r):
        if "X" not in r:
            raise InvalidInputError("missing input X")
        if r["X"].as_numpy()[0] < 0:
            raise KeyError("/secret/path/model.py")
        return list(r["X"].as_numpy())

    requests = [_req(Y=np.array([1])), _req(X=np.array([-1])), _req(X=np.array([5]))]
    out = execute_batched(pb, requests, read=read, compute=lambda g: {"OUT": np.array(g)}, logger=pb.Logger)
    assert out[0].error.message == "missing input X" and out[0].error.code == "INVALID_ARG"
    assert out[1].error.code == "INTERNAL" and "/secret" not in out[1].error.message
    assert "KeyError" in out[1].error.message and "/secret/path" in FakeLogger.errors[-1]  # logged, not answered
    assert out[2].outputs["OUT"].tolist() == [5]


def test_compute_failure_answers_a_short_message(pb):
    def boom(good):
        raise RuntimeError('File "/usr/lib/python3/site-packages/torch/nn/functional.py", line 2233\nIndexError')

    out = execute_batched(pb, [_req(X=np.array([1])), _req(X=np.array([2]))],
                          read=lambda r: list(r["X"].as_numpy()), compute=boom, logger=pb.Logger)
    for o in out:
        assert o.error.code == "INTERNAL" and "site-packages" not in o.error.message and "\n" not in o.error.message
    assert "functional.py" in FakeLogger.errors[-1]


def test_a_request_that_fails_the_computation_fails_alone(pb):
    """One compute for the batch; when it fails, each request alone: only the culprit gets the (short) error."""
    calls = []

    def compute(good):
        calls.append(list(good))
        if 13 in good:
            raise IndexError('index out of range in self\nFile "/venv/site-packages/torch/nn/functional.py"')
        if -1 in good:
            raise InvalidInputError("negative")
        return {"OUT": np.array(good) * 2}

    requests = [_req(X=np.array([1, 2])), _req(X=np.array([13])), _req(X=np.array([3])), _req(X=np.array([-1]))]
    out = execute_batched(pb, requests, read=lambda r: list(r["X"].as_numpy()), compute=compute, logger=pb.Logger)
    assert out[0].outputs["OUT"].tolist() == [2, 4] and out[2].outputs["OUT"].tolist() == [6]
    assert out[1].error.code == "INTERNAL" and "IndexError" in out[1].error.message
    assert "site-packages" not in out[1].error.message and "\n" not in out[1].error.message
    assert out[3].error.code == "INVALID_ARG" and out[3].error.message == "negative"
    assert calls[0] == [1, 2, 13, 3, -1] and len(calls) == 5  # the batch, then each request alone


def test_rows_per_item(pb):
    requests = [_req(X=np.ones((2, 3))), _req(X=np.ones((1, 3)) * 2)]
    out = execute_batched(pb, requests, read=lambda r: [r["X"].as_numpy()], rows=len,
                          compute=lambda items: {"OUT": np.concatenate(items).sum(axis=1)})
    assert out[0].outputs["OUT"].tolist() == [3.0, 3.0] and out[1].outputs["OUT"].tolist() == [6.0]


def test_request_items_limits(pb):
    with pytest.raises(InvalidInputError, match="request has no text"):
        request_items(pb, _req(TEXT=np.zeros((0, 1), object)), "TEXT", "text", 4)
    with pytest.raises(InvalidInputError, match="5 texts in one request, more than the limit of 4"):
        request_items(pb, _req(TEXT=np.array([[b"a"]] * 5, object)), "TEXT", "text", 4)
    assert request_items(pb, _req(TEXT=np.array([[b"a"], [b"b"]], object)), "TEXT", "text", 4).tolist() == [b"a", b"b"]


def test_execute_each(pb):
    def handle(r):
        if r["X"].as_numpy()[0] == 0:
            raise InvalidInputError("zero")
        return [pb.Tensor("OUT", r["X"].as_numpy() * 2)]

    out = execute_each(pb, [_req(X=np.array([0])), _req(X=np.array([4]))], handle)
    assert out[0].error.message == "zero" and out[1].outputs["OUT"].tolist() == [8]


# ---------------------------------------------------------------------------------------------- the runner
class _Sum(torch.nn.Module):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return (input_ids * attention_mask).sum(dim=1, keepdim=True).float()  # (B, 1)


def _runner(pb, tmp_path, max_batch_size=8, kind="CPU"):
    version = tmp_path / "1"
    version.mkdir(exist_ok=True)
    torch.jit.script(_Sum()).save(str(version / "model.pt"))
    config = {"max_batch_size": max_batch_size, "default_model_filename": "model.pt",
              "input": [{"name": "input_ids", "data_type": "TYPE_INT64"},
                        {"name": "attention_mask", "data_type": "TYPE_INT64"}],
              "output": [{"name": "sum__0", "data_type": "TYPE_FP32"}],
              "parameters": {"INFERENCE_MODE": {"string_value": "true"}}}
    spec = importlib.util.spec_from_file_location("runner_under_test", RUNNER_SOURCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_repository": str(tmp_path), "model_version": "1",
                      "model_name": "summer", "model_instance_kind": kind, "model_instance_device_id": "0"})
    return model


def test_runner_groups_shapes_and_splits_back(pb, tmp_path):
    model = _runner(pb, tmp_path)
    forwards = []
    original = model._forward

    def spy(parts):
        forwards.append({k: np.concatenate(v).shape for k, v in parts.items()})
        return original(parts)

    model._forward = spy
    a = _req(input_ids=np.array([[1, 2, 3]]), attention_mask=np.array([[1, 1, 0]]))
    b = _req(input_ids=np.array([[4, 5], [6, 7]]), attention_mask=np.ones((2, 2), np.int64))
    c = _req(input_ids=np.array([[1, 1, 1], [2, 2, 2]]), attention_mask=np.ones((2, 3), np.int64))
    missing = _req(input_ids=np.array([[1]]))
    out = model.execute([a, b, c, missing])
    assert out[0].outputs["sum__0"].tolist() == [[3.0]]
    assert out[1].outputs["sum__0"].tolist() == [[9.0], [13.0]]
    assert out[2].outputs["sum__0"].tolist() == [[3.0], [6.0]]
    assert out[3].error.message == "missing input attention_mask" and out[3].error.code == "INVALID_ARG"
    assert sorted(f["input_ids"] for f in forwards) == [(2, 2), (3, 3)]  # one forward per shape group


def test_runner_forward_failure_has_no_traceback(pb, tmp_path):
    model = _runner(pb, tmp_path)

    def fail(arrays):
        raise RuntimeError("The following operation failed in the TorchScript interpreter.\n"
                           'File "/root/.venv/lib/python3.11/site-packages/torch/nn/functional.py"')

    model._forward = fail
    (out,) = model.execute([_req(input_ids=np.array([[1]]), attention_mask=np.array([[1]]))])
    assert out.error.code == "INTERNAL" and "site-packages" not in out.error.message
    assert "TorchScript" not in out.error.message


def test_runner_takes_read_only_inputs_without_touching_them(pb, tmp_path):
    model = _runner(pb, tmp_path)

    def frozen(a):
        a = np.array(a, np.int64)
        a.flags.writeable = False  # as Triton hands inputs over (shared memory)
        return a

    one = _req(input_ids=frozen([[1, 2]]), attention_mask=frozen([[1, 1]]))
    two = _req(input_ids=frozen([[3, 4]]), attention_mask=frozen([[1, 0]]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on a tensor over read-only memory
        (alone,) = model.execute([one])
        both = model.execute([one, two])
    assert alone.outputs["sum__0"].tolist() == [[3.0]]
    assert [r.outputs["sum__0"].tolist() for r in both] == [[[3.0]], [[3.0]]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the load failure where torch has no CUDA")
def test_runner_gpu_kind_without_cuda_fails_the_load(pb, tmp_path):
    with pytest.raises(pb.TritonModelException, match=r"summer: instance_group kind KIND_GPU .* sees 0 CUDA device"):
        _runner(pb, tmp_path, kind="GPU")


class _DeviceTensor(FakeTensor):
    """An input as the python backend hands it over with FORCE_CPU_ONLY_INPUT_TENSORS "no": not on the CPU, read
    through DLPack only (here a CPU torch tensor stands in for device memory)."""

    def is_cpu(self):
        return False

    def as_numpy(self):
        raise AssertionError("a GPU tensor has no numpy view")

    def to_dlpack(self):
        return torch.from_numpy(np.array(self._array)).__dlpack__()


def test_runner_takes_inputs_through_dlpack_as_the_numpy_path_would(pb, tmp_path):
    model = _runner(pb, tmp_path)
    ids, mask = np.array([[1, 2], [3, 4]], np.int64), np.array([[1, 1], [0, 1]], np.int64)
    host = model.execute([_req(input_ids=ids, attention_mask=mask), _req(input_ids=ids[:1], attention_mask=mask[:1])])
    device = model.execute([{"input_ids": _DeviceTensor("input_ids", ids), "attention_mask": _DeviceTensor(
        "attention_mask", mask.astype(np.int32))}, _req(input_ids=ids[:1], attention_mask=mask[:1])])  # mixed, cast
    assert [r.outputs["sum__0"].tolist() for r in device] == [r.outputs["sum__0"].tolist() for r in host]
    assert [r.outputs["sum__0"].tolist() for r in host] == [[[3.0], [4.0]], [[3.0]]]
