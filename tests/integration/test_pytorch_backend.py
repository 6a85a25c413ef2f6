"""The Python-based `pytorch` backend follows the libtorch backend's naming rules (NAME__index, forward arg names)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient

from clip_server import TritonServer


class Positional(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a + b, a * 2.0  # (B, 4), (B, 4)


class Named(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x - y  # (B, 4)


class Sized(torch.nn.Module):
    """Each output row: [rows of the forward that computed it, the row's other values]; work grows with the rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = torch.eye(128) * 0.5
        for _ in range(x.shape[0] * 40):
            acc = torch.tanh(acc @ acc + 0.1)
        rows = torch.full_like(x[:, :1], float(x.shape[0])) + acc.sum() * 0.0  # (B, 1)
        return torch.cat([rows, x[:, 1:]], dim=1)  # (B, 4)


def _config(name: str, inputs: list[str], outputs: list[str], max_batch: int = 8, delay_us: int = 20000) -> str:
    tensor = '  {{ name: "{}" data_type: TYPE_FP32 dims: [ 4 ] }}'
    return (
        f'name: "{name}"\nbackend: "pytorch"\nmax_batch_size: {max_batch}\ndefault_model_filename: "model.pt"\n'
        + "input [\n"
        + ",\n".join(tensor.format(n) for n in inputs)
        + "\n]\n"
        + "output [\n"
        + ",\n".join(tensor.format(n) for n in outputs)
        + "\n]\n"
        + f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}\n"
        + "instance_group [ { kind: KIND_CPU count: 1 } ]\n"
        + 'parameters { key: "INFERENCE_MODE" value: { string_value: "true" } }\n'
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("torch_repo")
    for name, module, inputs, outputs, options in [
        ("positional", Positional(), ["INPUT__0", "INPUT__1"], ["OUTPUT__1", "OUTPUT__0"], {}),
        ("named", Named(), ["y", "x"], ["out__0"], {}),  # listed in another order than forward(x, y)
        ("sized", Sized(), ["x"], ["out__0"], {"max_batch": 64, "delay_us": 1_000_000}),
    ]:
        (repo / name / "1").mkdir(parents=True)
        torch.jit.save(torch.jit.script(module), str(repo / name / "1" / "model.pt"))
        (repo / name / "config.pbtxt").write_text(_config(name, inputs, outputs, **options))
    with TritonServer(repo, exit_timeout=2) as s:
        yield s


def _infer(url: str, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
    client = httpclient.InferenceServerClient(url)
    try:
        tensors = []
        for name, array in inputs.items():
            t = httpclient.InferInput(name, list(array.shape), "FP32")
            t.set_data_from_numpy(array)
            tensors.append(t)
        result = client.infer(model, tensors)
        return {n: result.as_numpy(n) for n in outputs}
    finally:
        client.close()


def test_positional_inputs_and_indexed_outputs(server):
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.ones((2, 4), np.float32)
    out = _infer(server.http_url, "positional", {"INPUT__0": a, "INPUT__1": b}, ["OUTPUT__0", "OUTPUT__1"])
    np.testing.assert_array_equal(out["OUTPUT__0"], a + b)
    np.testing.assert_array_equal(out["OUTPUT__1"], a * 2)


def test_inputs_mapped_by_forward_argument_names(server):
    x = np.full((3, 4), 5, np.float32)
    y = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = _infer(server.http_url, "named", {"x": x, "y": y}, ["out__0"])
    np.testing.assert_array_equal(out["out__0"], x - y)


def test_concurrent_requests_are_merged_and_split_back(server):
    def one(i: int):
        x = np.full((1 + i % 3, 4), i, np.float32)
        return i, _infer(server.http_url, "named", {"x": x, "y": np.zeros_like(x)}, ["out__0"])["out__0"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(24)))
    for i, out in results:
        assert out.shape == (1 + i % 3, 4) and (out == i).all()
    client = httpclient.InferenceServerClient(server.http_url)
    stats = client.get_inference_statistics("named")["model_stats"][0]
    client.close()
    assert int(stats["execution_count"]) < int(stats["inference_count"])


def _executions(server, model: str) -> int:
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        return int(client.get_inference_statistics(model)["model_stats"][0]["execution_count"])
    finally:
        client.close()


def test_a_small_request_in_a_big_batch_is_computed_first_and_answered_at_once(server):
    """One execution of 1 + 24 + 24 rows (the batcher waits 1 s for them): the 1-row request gets its own forward and
    its answer before the 48-row forward is done; the others share one forward; every row is its request's."""
    sizes = {"small": 1, "big1": 24, "big2": 24}
    done: dict[str, tuple[float, np.ndarray]] = {}
    start = threading.Barrier(len(sizes))

    def one(name: str) -> None:
        x = np.full((sizes[name], 4), float(len(name)), np.float32)
        x[:, 1] = np.arange(sizes[name])
        start.wait()
        if name == "small":
            time.sleep(0.2)  # the last to arrive: batch order alone would put it last
        out = _infer(server.http_url, "sized", {"x": x}, ["out__0"])["out__0"]
        done[name] = (time.monotonic(), out)  # when its answer arrived

    before = _executions(server, "sized")
    threads = [threading.Thread(target=one, args=(n,)) for n in sizes]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert _executions(server, "sized") - before == 1  # one batch for Triton
    for name, (_, out) in done.items():
        assert out.shape == (sizes[name], 4)
        np.testing.assert_array_equal(out[:, 1], np.arange(sizes[name]))
        assert (out[:, 2:] == len(name)).all()
    assert (done["small"][1][:, 0] == 1).all()  # its own forward
    assert (done["big1"][1][:, 0] == 48).all() and (done["big2"][1][:, 0] == 48).all()
    assert done["small"][0] < min(done["big1"][0], done["big2"][0])


def test_small_batches_stay_one_forward(server):
    """8 one-row requests (8 rows <= 16): no early answers, one forward of 8 (online batching keeps its batch)."""
    start = threading.Barrier(8)

    def one(i: int) -> np.ndarray:
        start.wait()
        return _infer(server.http_url, "sized", {"x": np.full((1, 4), i, np.float32)}, ["out__0"])["out__0"]

    before = _executions(server, "sized")
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(one, range(8)))
    assert _executions(server, "sized") - before == 1
    assert all(o[0, 0] == 8 and o[0, 3] == i for i, o in enumerate(outs))
