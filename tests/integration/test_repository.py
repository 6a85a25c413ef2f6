"""`clip-triton build`: verified weights, generated configs, recorded torch version; the backend dir we assemble."""

from __future__ import annotations

import json
import shutil

import pytest

from clip_build.repository import MODELS, build_repository, generate_configs, read_info
from clip_runtime.params import read_parameters
from clip_server.backend_dir import assemble_backend_dir
from tests.configs import parameters, parse_config


def test_repository_layout_and_info(triton_repository, weights):
    manifest = json.loads((weights("clip") / "manifest.json").read_text())
    for name in MODELS:
        assert (triton_repository / name / "config.pbtxt").is_file(), name
        assert (triton_repository / name / "1").is_dir(), name
    for name in ("text_encoder", "image_encoder"):
        assert (triton_repository / name / "1" / "model.pt").is_file()
    assert (triton_repository / "preprocess_text" / "1" / "tokenizer.json").is_file()
    info = read_info(triton_repository)
    assert info["model_id"] == manifest["model_id"]
    assert info["torch_version"].startswith("2.") and info["dtype"] == "fp32"
    text_encoder = parse_config((triton_repository / "text_encoder" / "config.pbtxt").read_text())
    assert tuple(text_encoder.output[0].dims) == (manifest["projection_dim"],)
    assert parse_config((triton_repository / "image_encoder" / "config.pbtxt").read_text()).backend == "pytorch"


def test_chinese_clip_real_layout_builds(weights, tmp_path):
    """The real Chinese-CLIP preprocessor (height/width size, no center crop) builds, with an exact resize."""
    repo = build_repository(weights("chinese_clip"), tmp_path / "repo")
    text = (repo / "preprocess_image" / "config.pbtxt").read_text()
    assert tuple(parse_config(text).output[0].dims) == (3, 32, 32)
    p = read_parameters(parameters(text), ["resize_mode", "image_size", "do_center_crop"])
    assert p == {"resize_mode": "exact", "image_size": 32, "do_center_crop": False}
    assert tuple(parse_config((repo / "image_encoder" / "config.pbtxt").read_text()).input[0].dims) == (3, 32, 32)
    assert json.loads((repo / "clip_info" / "1" / "info.json").read_text())["image_size"] == 32


def test_sha_mismatch_stops_the_build(weights, tmp_path):
    bad = tmp_path / "weights"
    shutil.copytree(weights("clip"), bad)
    data = bytearray((bad / "vision.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "vision.parquet").write_bytes(bytes(data))
    from clip_build.weights import WeightsError

    with pytest.raises(WeightsError, match="sha256"):
        build_repository(bad, tmp_path / "repo")
    assert not (tmp_path / "repo" / "image_encoder" / "1" / "model.pt").exists()


def test_cli_build_rejects_tampered_weights(weights, tmp_path, caplog):
    from clip_client.cli import main

    bad = tmp_path / "weights"
    shutil.copytree(weights("clip"), bad)
    (bad / "tokenizer" / "tokenizer.json").write_text("{}")
    assert main(["build", "--weights", str(bad), "--repository", str(tmp_path / "repo")]) == 1
    assert any(
        "build failed" in r.getMessage() and "sha256" in r.getMessage() and "tokenizer.json" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    caplog.clear()
    shutil.copy2(weights("clip") / "tokenizer" / "tokenizer.json", bad / "tokenizer" / "tokenizer.json")
    data = bytearray((bad / "text.parquet").read_bytes())
    data[len(data) // 3] ^= 0x01
    (bad / "text.parquet").write_bytes(bytes(data))
    assert main(["build", "--weights", str(bad), "--repository", str(tmp_path / "repo2")]) == 1
    assert any("sha256" in r.getMessage() and "text.parquet" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "repo2" / "text_encoder" / "1" / "model.pt").exists()


def test_cli_build_limits_are_checked(weights, tmp_path, caplog):
    from clip_client.cli import main

    out = tmp_path / "repo"
    assert (
        main(["build", "--weights", str(weights("clip")), "--repository", str(out), "--limit", "max_pixels=lots"]) == 2
    )
    assert any("max_pixels" in r.getMessage() for r in caplog.records)
    assert main(["build", "--weights", str(weights("clip")), "--repository", str(out), "--limit", "nonsense=1"]) == 2
    assert (
        main(
            [
                "build",
                "--weights",
                str(weights("clip")),
                "--repository",
                str(out),
                "--limit",
                "max_pixels=1000",
                "--preferred-batch-size",
                "2",
                "0",
            ]
        )
        == 1
    )  # a preferred size out of 1..max_batch_size
    assert (
        main(
            [
                "build",
                "--weights",
                str(weights("clip")),
                "--repository",
                str(out),
                "--limit",
                "max_pixels=1000",
                "--limit",
                "allowed_formats=PNG",
                "--limit",
                "max_items_per_request=8",
                "--cores",
                "6",
                "--instance-count",
                "3",
                "--preferred-batch-size",
                "16",
                "2",
            ]
        )
        == 0
    )
    assert '"1000"' in (out / "preprocess_image" / "config.pbtxt").read_text()
    tuning = read_info(out)["encoders"]  # the defaults for 6 cores, the options given over them
    assert tuning["text_encoder"] == {"instances": 3, "threads": 6, "preferred": [2, 16], "queue_delay_us": 30000}
    assert tuning["image_encoder"] == {"instances": 3, "threads": 6, "preferred": [2, 16], "queue_delay_us": 30000}
    image = parse_config((out / "image_encoder" / "config.pbtxt").read_text())
    assert image.instance_group[0].count == 3 and list(image.dynamic_batching.preferred_batch_size) == [2, 16]
    assert read_parameters(
        parameters((out / "image_encoder" / "config.pbtxt").read_text()), ["INTRA_OP_THREAD_COUNT"]
    ) == {"INTRA_OP_THREAD_COUNT": 6}
    info = json.loads((out / "clip_info" / "1" / "info.json").read_text())
    assert info["limits"]["max_pixels"] == 1000 and info["limits"]["allowed_formats"] == ["PNG"]
    assert info["max_items_per_request"] == 8 and info["model_id"] in (out / "postprocess" / "config.pbtxt").read_text()


@pytest.mark.parametrize(
    "name", ["logit_scale", "model_id", "max_length", "pad_token_id", "tokenizer_file", "image_mean", "resize_mode"]
)
def test_limits_cannot_override_the_manifest(weights, tmp_path, caplog, name):
    from clip_client.cli import main

    manifest = json.loads((weights("clip") / "manifest.json").read_text())
    with pytest.raises(ValueError, match=f"'{name}' cannot be set with --limit; allowed: max_items_per_request, "):
        generate_configs(manifest, limits={name: "1"})
    with pytest.raises(ValueError, match="allowed: .*default_top_k"):
        build_repository(weights("clip"), tmp_path / "repo", limits={name: "1"})
    assert not (tmp_path / "repo").exists()  # refused before anything is written
    assert (
        main(
            [
                "build",
                "--weights",
                str(weights("clip")),
                "--repository",
                str(tmp_path / "repo2"),
                "--limit",
                f"{name}=1",
            ]
        )
        == 2
    )
    assert any(
        f"bad --limit '{name}=1'" in r.getMessage() and "default_top_k" in r.getMessage() for r in caplog.records
    ), [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize(
    "item",
    [
        "max_pixels=0",
        "max_items_per_request=-1",
        "allowed_formats=",
        "allowed_formats=EXE",
        "jpeg_draft_gap=0.5",
        "default_top_k=0",
        "default_top_k=x",
        "pad_to_multiple_of=16",
    ],
)  # gone: ragged batching pads each batch to its longest
def test_limit_values_are_checked(weights, tmp_path, item):
    from clip_client.cli import main

    assert main(["build", "--weights", str(weights("clip")), "--repository", str(tmp_path / "r"), "--limit", item]) == 2


def test_backend_dir_is_ours(tmp_path):
    root = assemble_backend_dir(tmp_path)
    assert (root / "python" / "libtriton_python.so").is_file()
    assert (root / "python" / "triton_python_backend_stub").is_file()
    assert (root / "pytorch" / "model.py").is_file()
    assert assemble_backend_dir(tmp_path) == root  # cached by content
