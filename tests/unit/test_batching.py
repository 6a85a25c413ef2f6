"""The one execute loop (clip_runtime.batching) and the Python-based pytorch runner that uses it, Triton faked."""

from __future__ import annotations

import importlib.util
import json
import warnings

import numpy as np
import pytest
import torch

from clip_build.modules.layers import ragged_rows
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
    out = execute_batched(
        pb,
        requests,
        read=lambda r: list(r["X"].as_numpy()),
        prepare=prepare,
        compute=lambda good: seen.append(good) or {"OUT": np.array(good)},
        label="thing",
    )
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

    out = execute_batched(
        pb,
        [_req(X=np.array([1])), _req(X=np.array([2]))],
        read=lambda r: list(r["X"].as_numpy()),
        compute=boom,
        logger=pb.Logger,
    )
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
    out = execute_batched(
        pb,
        requests,
        read=lambda r: [r["X"].as_numpy()],
        rows=len,
        compute=lambda items: {"OUT": np.concatenate(items).sum(axis=1)},
    )
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


class _RowSums(torch.nn.Module):
    """The text encoder's input contract (a ragged batch of token rows) -> each row's sum of tokens."""

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
        ids, mask = ragged_rows(input_ids, lengths, widths, 8)  # (B, T) each
        return (ids * mask).sum(dim=1, keepdim=True).float()  # (B, 1)


def _runner(pb, tmp_path, max_batch_size=8, kind="CPU", ragged=False):
    version = tmp_path / "1"
    version.mkdir(exist_ok=True)
    torch.jit.script(_RowSums() if ragged else _Sum()).save(str(version / "model.pt"))
    names = ["input_ids", "lengths"] if ragged else ["input_ids", "attention_mask"]
    config = {
        "max_batch_size": max_batch_size,
        "default_model_filename": "model.pt",
        "input": [
            {"name": n, "data_type": "TYPE_INT64", "allow_ragged_batch": ragged and n == "input_ids"} for n in names
        ],
        "output": [{"name": "sum__0", "data_type": "TYPE_FP32"}],
        "parameters": {"INFERENCE_MODE": {"string_value": "true"}},
    }
    if ragged:  # as Triton's JSON of clip_build's text_encoder config
        config["batch_input"] = [
            {
                "kind": "BATCH_ITEM_SHAPE",
                "target_name": ["widths"],
                "data_type": "TYPE_INT32",
                "source_input": ["input_ids"],
            }
        ]
    spec = importlib.util.spec_from_file_location("runner_under_test", RUNNER_SOURCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize(
        {
            "model_config": json.dumps(config),
            "model_repository": str(tmp_path),
            "model_version": "1",
            "model_name": "summer",
            "model_instance_kind": kind,
            "model_instance_device_id": "0",
        }
    )
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
        raise RuntimeError(
            "The following operation failed in the TorchScript interpreter.\n"
            'File "/root/.venv/lib/python3.11/site-packages/torch/nn/functional.py"'
        )

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
    device = model.execute(
        [
            {
                "input_ids": _DeviceTensor("input_ids", ids),
                "attention_mask": _DeviceTensor("attention_mask", mask.astype(np.int32)),
            },
            _req(input_ids=ids[:1], attention_mask=mask[:1]),
        ]
    )  # mixed, cast
    assert [r.outputs["sum__0"].tolist() for r in device] == [r.outputs["sum__0"].tolist() for r in host]
    assert [r.outputs["sum__0"].tolist() for r in host] == [[[3.0], [4.0]], [[3.0]]]


class _Answerable(dict):
    """A request whose response sender records when it sends (python backend 24.10: non-decoupled models may answer
    a request through it and put None in execute's list)."""

    def __init__(self, events, name, **arrays):
        super().__init__(_req(**arrays))
        self.events, self.name = events, name

    def get_response_sender(self):
        request = self

        class Sender:
            def send(self, response, flags=None):
                request.events.append(("sent", request.name, response.outputs["sum__0"].tolist(), flags))

        return Sender()


def test_runner_answers_the_smallest_requests_of_a_big_cpu_batch_first(pb, tmp_path):
    """1 + 10 + 10 rows (> 16): the 1-row request gets its own forward and is sent before the 20-row forward runs;
    execute's list holds None in its place. A batch of <= 16 rows stays one forward, answered at the end."""
    model = _runner(pb, tmp_path, max_batch_size=64)
    events = []
    original = model._forward

    def spy(parts):
        events.append(("forward", len(next(iter(parts.values()))), sum(len(p) for p in parts["input_ids"])))
        return original(parts)

    model._forward = spy
    ones = np.ones((10, 2), np.int64)
    small = _Answerable(events, "small", input_ids=np.array([[5, 6]]), attention_mask=np.array([[1, 1]]))
    big = [_Answerable(events, f"big{i}", input_ids=ones * (i + 1), attention_mask=ones) for i in range(2)]
    out = model.execute([big[0], small, big[1]])
    assert events == [
        ("forward", 1, 1),
        ("sent", "small", [[11.0]], pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL),
        ("forward", 2, 20),
    ]
    assert out[1] is None
    assert out[0].outputs["sum__0"].tolist() == [[2.0]] * 10 and out[2].outputs["sum__0"].tolist() == [[4.0]] * 10

    events.clear()
    few = [
        _Answerable(events, f"r{i}", input_ids=np.array([[i, 1]]), attention_mask=np.array([[1, 1]])) for i in range(8)
    ]
    out = model.execute(few)
    assert events == [("forward", 8, 8)] and [o.outputs["sum__0"].tolist() for o in out] == [
        [[i + 1.0]] for i in range(8)
    ]


def test_runner_never_raises_once_an_answer_was_sent(pb, tmp_path):
    """After the early answer went out, a failure while computing the rest answers the rest INTERNAL (a raising
    execute would make the backend release the sent request's response factory again); a send that fails is logged
    and not answered twice."""
    model = _runner(pb, tmp_path, max_batch_size=64)
    events = []
    ones = np.ones((10, 2), np.int64)
    small = _Answerable(events, "small", input_ids=np.array([[5, 6]]), attention_mask=np.array([[1, 1]]))
    big = [_Answerable(events, f"big{i}", input_ids=ones, attention_mask=ones) for i in range(2)]
    original, calls = model._execute_batched, []

    def second_fails(requests):
        calls.append(len(requests))
        if len(calls) == 2:
            raise RuntimeError("/secret/path/model.py: boom")
        return original(requests)

    model._execute_batched = second_fails
    out = model.execute([big[0], small, big[1]])
    assert [e[:2] for e in events] == [("sent", "small")] and out[1] is None
    for r in (out[0], out[2]):
        assert r.error.code == "INTERNAL" and "/secret" not in r.error.message

    class Broken(_Answerable):
        def get_response_sender(self):
            class Sender:
                def send(self, response, flags=None):
                    raise RuntimeError("Unable to send response. Response sender has been closed.")

            return Sender()

    model._execute_batched = original
    small = Broken(events, "small", input_ids=np.array([[5, 6]]), attention_mask=np.array([[1, 1]]))
    out = model.execute([big[0], small, big[1]])
    assert out[1] is None and out[0].outputs["sum__0"].tolist() == [[2.0]] * 10
    assert any("could not send an early response" in e for e in pb.Logger.errors)


def test_runner_answers_early_requests_with_the_rest_where_the_stub_cannot_send(pb, tmp_path):
    """A request without a response sender (an older python backend) is answered in execute's list, in order."""
    model = _runner(pb, tmp_path, max_batch_size=64)
    ones = np.ones((10, 2), np.int64)
    reqs = [
        _req(input_ids=ones, attention_mask=ones),
        _req(input_ids=np.array([[5, 6]]), attention_mask=np.ones((1, 2))),
    ]
    reqs.append(_req(input_ids=ones * 2, attention_mask=ones))
    out = model.execute(reqs)
    assert [o.outputs["sum__0"].tolist() for o in out] == [[[2.0]] * 10, [[11.0]], [[4.0]] * 10]


# ---------------------------------------------------------------------------------------------- ragged batches
def _rows(ids, lengths):
    return _req(input_ids=np.array(ids, np.int64), lengths=np.array(lengths, np.int64).reshape(-1, 1))


def test_runner_passes_ragged_inputs_as_libtorch_does(pb, tmp_path):
    """libtorch.cc (r24.10, SetInputTensors): a ragged input is ONE 1-D tensor, the requests' buffers flattened and
    concatenated in request order; other inputs [total batch, ...]; the BATCH_ITEM_SHAPE batch input [total batch,
    ndims - 1] in its config dtype (backend_input_collector.cc, SetBatchItemShape); outputs split back by each
    request's batch size. Requests of different lengths share one forward."""
    model = _runner(pb, tmp_path, ragged=True)
    seen = []
    scripted = model.model
    model.model = lambda *args: seen.append([a.clone() for a in args]) or scripted(*args)
    a = _rows([[1, 2, 3]], [2])
    b = _rows([[4, 5], [6, 0]], [2, 1])
    c = _rows([[7, 8, 9, 10], [1, 1, 0, 0]], [4, 2])
    out = model.execute([a, b, c])
    assert len(seen) == 1  # one forward for three lengths
    ids, lengths, widths = seen[0]
    assert ids.tolist() == [1, 2, 3, 4, 5, 6, 0, 7, 8, 9, 10, 1, 1, 0, 0]  # 1-D, request order, row-major
    assert lengths.tolist() == [[2], [2], [1], [4], [2]] and widths.tolist() == [[3], [2], [2], [4], [4]]
    assert widths.dtype == torch.int32 and lengths.dtype == torch.int64
    assert [o.outputs["sum__0"].tolist() for o in out] == [[[3.0]], [[9.0], [6.0]], [[34.0], [2.0]]]
    alone = [model.execute([r])[0].outputs["sum__0"].tolist() for r in (a, b, c)]
    assert alone == [o.outputs["sum__0"].tolist() for o in out]


def test_runner_checks_the_rows_forward_returns(pb, tmp_path):
    """An output without one row per batch row cannot be split back: that batch fails, each request is retried
    alone (clip_runtime.batching), nothing is misattributed."""
    model = _runner(pb, tmp_path, ragged=True)
    model.model = lambda ids, lengths, widths: torch.zeros(1, 1)  # always one row
    one, two = model.execute([_rows([[1]], [1]), _rows([[1], [2]], [1, 1])])
    assert one.outputs["sum__0"].tolist() == [[0.0]]
    assert two.error.code == "INTERNAL" and "returned shape [1, 1] for a batch of 2" in FakeLogger.errors[-1]


def test_ragged_rows_repads_to_the_longest_row():
    flat = torch.tensor([5, 6, 0, 7, 0, 0, 8, 9, 4])  # rows [5 6 .] [7 . .] (width 3) then [8 9 4] (width 3)
    ids, mask = ragged_rows(flat, torch.tensor([[2], [1], [3]]), torch.tensor([[3], [3], [3]]), 77)
    assert ids.tolist() == [[5, 6, 0], [7, 0, 0], [8, 9, 4]] and mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]
    ids, mask = ragged_rows(torch.tensor([1, 2, 0, 0, 3, 0, 0, 0]), torch.tensor([2, 1]), torch.tensor([4, 4]), 77)
    assert ids.tolist() == [[1, 2], [3, 0]] and mask.tolist() == [[1, 1], [1, 0]]  # T = 2, not the widths' 4
    ids, _ = ragged_rows(torch.arange(1, 11), torch.tensor([10]), torch.tensor([10]), 4)
    assert ids.tolist() == [[1, 2, 3, 4]]  # cut to the position table


@pytest.mark.parametrize(
    "flat,lengths,widths",
    [
        ([1, 2, 3], [5, 5], [2, 2]),  # lengths over widths
        ([1, 2, 3], [2, 2], [10**15, 10**15]),  # widths whose sum is far past the ids
        ([1, 2, 3], [-4, 2], [-1, -9]),  # negative counts
        ([], [3, 1], [3, 1]),  # no ids at all
        ([1, 2, 3], [], []),  # no rows
        ([1, 2, 3], [2, 2, 2], [1]),  # fewer widths than rows
        ([1, 2, 3], [10**18], [10**18]),
    ],
)
def test_ragged_rows_takes_any_values(flat, lengths, widths):
    """No value Triton accepts for input_ids, lengths, widths makes the re-padding raise or read out of range."""
    ids, mask = ragged_rows(
        torch.tensor(flat, dtype=torch.int64),
        torch.tensor(lengths, dtype=torch.int64),
        torch.tensor(widths, dtype=torch.int64),
        77,
    )
    assert ids.shape == mask.shape and ids.shape[0] == len(lengths) and 1 <= ids.shape[1] <= 77
    assert set(ids[mask == 1].tolist()) <= set(flat) and (ids[mask == 0] == 0).all()


def test_runner_refuses_batch_inputs_it_cannot_make(pb, tmp_path):
    model = _runner(pb, tmp_path, ragged=True)
    config = {
        "max_batch_size": 8,
        "input": [{"name": "input_ids", "data_type": "TYPE_INT64"}],
        "output": [{"name": "sum__0", "data_type": "TYPE_FP32"}],
        "batch_input": [
            {
                "kind": "BATCH_ELEMENT_COUNT",
                "target_name": ["n"],
                "data_type": "TYPE_INT32",
                "source_input": ["input_ids"],
            }
        ],
    }
    with pytest.raises(pb.TritonModelException, match="batch_input kind BATCH_ELEMENT_COUNT is not supported"):
        type(model)().initialize(
            {
                "model_config": json.dumps(config),
                "model_repository": str(tmp_path),
                "model_version": "1",
                "model_name": "summer",
            }
        )


class _CancelledAfter(dict):
    """A request that reports cancelled from its `after`-th is_cancelled() call on (0: from the start)."""

    def __init__(self, after: int, **arrays):
        super().__init__(_req(**arrays))
        self.after, self.calls = after, 0

    def is_cancelled(self) -> bool:
        self.calls += 1
        return self.calls > self.after


def test_cancelled_requests_are_skipped_before_reading_and_before_computing(pb):
    """Cancelled when execute starts: not read; cancelled while the batch was prepared: not computed."""
    computed, read = [], []

    def compute(items):
        computed.extend(items)
        return {"OUT": np.array(items, dtype=np.int64)}

    def read_x(r):
        read.append(int(r["X"].as_numpy()[0, 0]))
        return list(r["X"].as_numpy().reshape(-1))

    requests = [
        _CancelledAfter(0, X=np.array([[1]])),
        _CancelledAfter(1, X=np.array([[2]])),
        _CancelledAfter(9, X=np.array([[3]])),
    ]
    out = execute_batched(pb, requests, read=read_x, compute=compute)
    assert (
        read,
        computed,
        [o.outputs["OUT"].tolist() if o.error is None else "cancelled" in o.error.message for o in out],
    ) == ([2, 3], [3], [True, True, [3]])
