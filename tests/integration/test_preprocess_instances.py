"""`build --preprocess-instances`: several preprocessor instances load on the real server, each serves, and the pixels,
tokens and embeddings are what one instance gives (the exact path)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import tritonclient.grpc as grpcclient

from clip_build.repository import build_repository, read_info
from clip_build.weights import load_manifest
from clip_client import CLIPClient
from clip_common.contract import PreprocessImage
from clip_loadtest.bench import image_config_for
from clip_loadtest.workload import jpeg_images, short_prompts
from clip_runtime.image import ImagePreprocessor
from clip_server import TritonServer
from tests.configs import parse_config


def _pixels(url: str, images: list[bytes]) -> np.ndarray:
    """PIXEL_VALUES from the internal preprocess_image model (the inference API serves it)."""
    client = grpcclient.InferenceServerClient(url)
    item = grpcclient.InferInput(PreprocessImage.IMAGE, [len(images), 1], "BYTES")
    item.set_data_from_numpy(np.array([[b] for b in images], dtype=object))
    return client.infer(PreprocessImage.NAME, [item]).as_numpy(PreprocessImage.PIXEL_VALUES)  # (N, 3, S, S)


def _cpu_seconds(pids: list[int]) -> list[float]:
    return [sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids]


def test_several_preprocess_instances_serve_the_exact_results(weights, triton_server, tmp_path):
    repo = build_repository(
        weights("clip"), tmp_path / "repo", preprocess_instances="3,2", limits={"decode_threads": 1}
    )
    assert read_info(repo)["preprocess"] == {
        "image_instances": 3,
        "text_instances": 2,
        "decode_threads": 1,
        "image_decode": "cpu",
        "rule": "explicit",
        "cores": read_info(repo)["preprocess"]["cores"],
    }
    info = json.loads((repo / "clip_info" / "1" / "info.json").read_text())
    assert info["preprocess"] == {"image_instances": 3, "text_instances": 2, "decode_threads": 1, "image_decode": "cpu"}
    assert parse_config((repo / "preprocess_image" / "config.pbtxt").read_text()).instance_group[0].count == 3

    images = jpeg_images(24, seed=11)  # 224x224 ... 1024x768
    texts = short_prompts(12)
    exact = ImagePreprocessor(image_config_for(load_manifest(weights("clip"))))
    with TritonServer(repo, log_path=tmp_path / "tritonserver.log", exit_timeout=3) as server:
        stubs = server.stubs()
        assert len(stubs["preprocess_image"]) == 3 and len(stubs["preprocess_text"]) == 2
        before = _cpu_seconds(stubs["preprocess_image"])
        batches = [images[i : i + 4] for i in range(0, len(images), 4)] * 3
        with ThreadPoolExecutor(6) as pool:  # concurrent requests: the scheduler hands them to free instances
            served = list(pool.map(lambda batch: _pixels(server.grpc_url, batch), batches))
        busy = [b - a for a, b in zip(before, _cpu_seconds(stubs["preprocess_image"]))]
        assert sum(t > 0 for t in busy) >= 2, busy  # more than one instance did the decoding
        for batch, pixels in zip(batches, served):
            assert np.array_equal(pixels, exact(batch))  # bit for bit the exact path, whichever instance served it
        with CLIPClient(server.grpc_url) as many, CLIPClient(triton_server.grpc_url) as one:
            np.testing.assert_allclose(many.encode_image(images[:8]), one.encode_image(images[:8]), atol=1e-5)
            np.testing.assert_allclose(many.encode_text(texts), one.encode_text(texts), atol=1e-5)
        assert not server.dead_stubs()
