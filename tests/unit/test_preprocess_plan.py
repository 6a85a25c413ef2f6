"""`build --preprocess-instances` / `--image-decode`: the auto rule, explicit counts, and what the configs and clip_info
say about them."""

from __future__ import annotations

import json

import pytest

from clip_build.preprocess_plan import PreprocessPlan, parse_instances, plan_preprocessing
from clip_build.repository import generate_configs, info_payload, server_args
from clip_common import contract as C
from clip_runtime.params import read_parameters
from tests.configs import parameters, parse_config


def _plan(**kw) -> tuple:
    p = plan_preprocessing(**kw)
    return p.image_instances, p.text_instances, p.decode_threads, p.image_decode, p.rule


def test_auto_keeps_cpu_builds_as_measured_and_spreads_gpu_builds_over_the_cores():
    assert _plan(instance_kind="cpu", cores=16) == (1, 1, 0, "cpu", "auto")  # today's defaults, issue 13 tunes them
    assert _plan(instance_kind="gpu", cores=16) == (8, 2, 2, "cpu", "auto")  # 8 processes x 2 threads = 16 cores
    assert _plan(instance_kind="gpu", cores=2) == (1, 1, 2, "cpu", "auto")
    assert _plan(instance_kind="gpu", cores=128)[:2] == (32, 16)  # capped: each instance is a stub process
    assert _plan(instance_kind="gpu", image_decode="gpu", cores=16) == (4, 2, 2, "gpu", "auto")
    assert _plan(instance_kind="gpu", image_decode="gpu", cores=96)[0] == 8  # each holds a CUDA context
    assert plan_preprocessing("cpu").cores >= 1  # this machine's cores when none are given


def test_explicit_counts_and_decode_threads():
    assert _plan(instance_kind="cpu", instances="3", cores=16) == (3, 1, 0, "cpu", "explicit")
    assert _plan(instance_kind="gpu", instances="3,2", cores=16) == (3, 2, 0, "cpu", "explicit")
    assert _plan(instance_kind="gpu", cores=16, decode_threads=6)[2] == 6  # --limit decode_threads wins
    assert parse_instances(" AUTO ") is None
    for bad in ("0", "2,0", "x", "1,2,3", ""):
        with pytest.raises(ValueError, match="auto, N or N,M"):
            parse_instances(bad)
    with pytest.raises(ValueError, match="--image-decode gpu needs --instance-kind gpu"):
        plan_preprocessing("cpu", "gpu")
    with pytest.raises(ValueError, match="image_decode must be one of"):
        plan_preprocessing("gpu", "nvdec")


def test_configs_and_clip_info_carry_the_plan(manifest):
    plan = PreprocessPlan(
        image_instances=5, text_instances=3, decode_threads=2, image_decode="cpu", rule="auto", cores=16
    )
    configs = generate_configs(manifest, instance_kind="gpu", preprocess=plan)
    image, text = parse_config(configs[C.PreprocessImage.NAME]), parse_config(configs[C.PreprocessText.NAME])
    assert [(g.count, g.kind) for g in image.instance_group] == [(5, image.instance_group[0].KIND_CPU)]
    assert [g.count for g in text.instance_group] == [3]
    p = read_parameters(parameters(configs[C.PreprocessImage.NAME]), ["decode_threads", "image_decode"])
    assert p == {"decode_threads": 2, "image_decode": "cpu"}
    encoder = parameters(configs[C.ImageEncoder.NAME])["parameters"]
    assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in encoder  # the exact path hands pixels over on the host
    info = info_payload(manifest, preprocess=plan)["preprocess"]
    assert info == {"image_instances": 5, "text_instances": 3, "decode_threads": 2, "image_decode": "cpu"}
    assert info_payload(manifest)["preprocess"]["image_instances"] == 1  # a CPU build's default


def test_gpu_decode_configs(manifest):
    configs = generate_configs(manifest, instance_kind="gpu", preprocess=plan_preprocessing("gpu", "gpu", cores=16))
    (group,) = parse_config(configs[C.PreprocessImage.NAME]).instance_group
    assert (group.count, group.kind) == (4, group.KIND_GPU)  # nvJPEG per GPU instance
    assert read_parameters(parameters(configs[C.PreprocessImage.NAME]), ["image_decode"]) == {"image_decode": "gpu"}
    # the pixels reach the encoder on the GPU: the python backend (our runner) must not move them to the host
    encoder = parameters(configs[C.ImageEncoder.NAME])["parameters"]
    assert encoder["FORCE_CPU_ONLY_INPUT_TENSORS"] == {"string_value": "no"}
    assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in parameters(configs[C.TextEncoder.NAME])["parameters"]


def test_server_args_give_gpu_decode_a_cuda_pool(tmp_path):
    def info(decode):
        (tmp_path / "clip_triton.json").write_text(
            json.dumps(
                {
                    "max_batch_size": 256,
                    "preprocess": {"image_decode": decode},
                    "exports": {"image_encoder": {"inputs": [{"shape": [-1, 3, 224, 224]}]}},
                }
            )
        )
        return server_args(tmp_path)

    assert server_args(tmp_path) == []  # no clip_triton.json: nothing to add
    assert info("cpu") == []
    assert info("gpu") == [f"--cuda-memory-pool-byte-size=0:{8 * 256 * 3 * 224 * 224 * 4}"]  # 8 full pixel batches
