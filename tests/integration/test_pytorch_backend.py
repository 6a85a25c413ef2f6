"""The Python-based `pytorch` backend follows the libtorch backend's naming rules (NAME__index, forward arg names)."""

from __future__ import annotations

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


def _config(name: str, inputs: list[str], outputs: list[str]) -> str:
    tensor = '  {{ name: "{}" data_type: TYPE_FP32 dims: [ 4 ] }}'
    return (
        f'name: "{name}"\nbackend: "pytorch"\nmax_batch_size: 8\ndefault_model_filename: "model.pt"\n'
        + "input [\n"
        + ",\n".join(tensor.format(n) for n in inputs)
        + "\n]\n"
        + "output [\n"
        + ",\n".join(tensor.format(n) for n in outputs)
        + "\n]\n"
        + "dynamic_batching { max_queue_delay_microseconds: 20000 }\n"
        + "instance_group [ { kind: KIND_CPU count: 1 } ]\n"
        + 'parameters { key: "INFERENCE_MODE" value: { string_value: "true" } }\n'
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("torch_repo")
    for name, module, inputs, outputs in [
        ("positional", Positional(), ["INPUT__0", "INPUT__1"], ["OUTPUT__1", "OUTPUT__0"]),
        ("named", Named(), ["y", "x"], ["out__0"]),  # listed in another order than forward(x, y)
    ]:
        (repo / name / "1").mkdir(parents=True)
        torch.jit.save(torch.jit.script(module), str(repo / name / "1" / "model.pt"))
        (repo / name / "config.pbtxt").write_text(_config(name, inputs, outputs))
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
