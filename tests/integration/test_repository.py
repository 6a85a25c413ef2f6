"""`clip-triton build`: verified weights, generated configs, recorded torch version; the backend dir we assemble."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from clip_build.repository import MODELS, build_repository, generate_configs, read_info
from clip_build.runtime.params import read_parameters
from clip_build.tritonserver import assemble_backend_dir


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
    d = manifest["projection_dim"]
    assert f"dims: [ {d} ]" in (triton_repository / "text_encoder" / "config.pbtxt").read_text()
    assert 'backend: "pytorch"' in (triton_repository / "image_encoder" / "config.pbtxt").read_text()


def test_generated_parameters_parse_back(weights):
    manifest = json.loads((weights("clip") / "manifest.json").read_text())
    configs = generate_configs(manifest, instance_kind="gpu", instance_count=2, max_batch_size=16,
                               limits={"max_pixels": 1234})
    assert "KIND_GPU" in configs["image_encoder"] and "count: 2" in configs["text_encoder"]
    assert "KIND_CPU" in configs["preprocess_image"]  # python models stay on CPU
    assert "max_batch_size: 16" in configs["preprocess_text"]
    assert "max_pixels" in configs["preprocess_image"] and '"1234"' in configs["preprocess_image"]
    # the logit scale travels with the weights
    assert repr(float(manifest["logit_scale"])) in configs["postprocess"]
    assert "optional: true" in configs["zero_shot"]


def test_chinese_clip_real_layout_builds(weights, tmp_path):
    """The real Chinese-CLIP preprocessor (height/width size, no center crop) builds, with an exact resize."""
    repo = build_repository(weights("chinese_clip"), tmp_path / "repo")
    text = (repo / "preprocess_image" / "config.pbtxt").read_text()
    assert "dims: [ 3, 32, 32 ]" in text
    p = read_parameters({"parameters": _parameters_of(text)}, ["resize_mode", "image_size", "do_center_crop"])
    assert p == {"resize_mode": "exact", "image_size": 32, "do_center_crop": False}
    assert "dims: [ 3, 32, 32 ]" in (repo / "image_encoder" / "config.pbtxt").read_text()
    assert json.loads((repo / "clip_info" / "1" / "info.json").read_text())["image_size"] == 32


def test_old_manifest_shortest_edge_without_crop_is_refused(weights):
    manifest = json.loads((weights("chinese_clip") / "manifest.json").read_text())
    manifest["image"] = {**manifest["image"], "shortest_edge": 32}
    for key in ("resize_mode", "resize_size"):
        manifest["image"].pop(key)
    with pytest.raises(ValueError, match="without a center crop"):
        generate_configs(manifest)


def test_image_flags_reach_the_preprocessor(weights):
    manifest = json.loads((weights("clip") / "manifest.json").read_text())
    manifest["image"] = {**manifest["image"], "do_normalize": False, "do_rescale": False}
    text = generate_configs(manifest)["preprocess_image"]
    p = read_parameters({"parameters": _parameters_of(text)}, ["image_mean", "image_std", "rescale_factor"])
    assert p == {"image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0], "rescale_factor": 1.0}
    manifest["image"]["do_resize"] = False
    with pytest.raises(ValueError, match="do_resize=false"):
        generate_configs(manifest)


def _parameters_of(pbtxt: str) -> dict:
    """key -> {"string_value": ...} from a generated config.pbtxt's parameters blocks (values hold no quotes)."""
    found = re.findall(r'key: "([^"]*)"\n  value: \{ string_value: "([^"]*)" \}', pbtxt)
    return {k: {"string_value": v} for k, v in found}


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
    assert any("build failed" in r.getMessage() and "sha256" in r.getMessage() and "tokenizer.json" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
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
    assert main(["build", "--weights", str(weights("clip")), "--repository", str(out), "--limit", "max_pixels=lots"]) == 2
    assert any("max_pixels" in r.getMessage() for r in caplog.records)
    assert main(["build", "--weights", str(weights("clip")), "--repository", str(out), "--limit", "nonsense=1"]) == 2
    assert main(["build", "--weights", str(weights("clip")), "--repository", str(out), "--limit", "max_pixels=1000",
                 "--limit", "allowed_formats=PNG", "--limit", "max_items_per_request=8"]) == 0
    assert '"1000"' in (out / "preprocess_image" / "config.pbtxt").read_text()
    info = json.loads((out / "clip_info" / "1" / "info.json").read_text())
    assert info["limits"]["max_pixels"] == 1000 and info["limits"]["allowed_formats"] == ["PNG"]
    assert info["max_items_per_request"] == 8 and info["model_id"] in (out / "postprocess" / "config.pbtxt").read_text()


@pytest.mark.parametrize("name", ["logit_scale", "model_id", "max_length", "pad_token_id", "tokenizer_file",
                                  "image_mean", "resize_mode"])
def test_limits_cannot_override_the_manifest(weights, tmp_path, caplog, name):
    from clip_client.cli import main

    manifest = json.loads((weights("clip") / "manifest.json").read_text())
    with pytest.raises(ValueError, match=f"'{name}' cannot be set with --limit; allowed: max_items_per_request, "):
        generate_configs(manifest, limits={name: "1"})
    with pytest.raises(ValueError, match="allowed: .*default_top_k"):
        build_repository(weights("clip"), tmp_path / "repo", limits={name: "1"})
    assert not (tmp_path / "repo").exists()  # refused before anything is written
    assert main(["build", "--weights", str(weights("clip")), "--repository", str(tmp_path / "repo2"),
                 "--limit", f"{name}=1"]) == 2
    assert any(f"bad --limit '{name}=1'" in r.getMessage() and "pad_to_multiple_of" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("item", ["max_pixels=0", "max_items_per_request=-1", "allowed_formats=", "allowed_formats=EXE",
                                  "jpeg_draft_gap=0.5", "default_top_k=0", "pad_to_multiple_of=x"])
def test_limit_values_are_checked(weights, tmp_path, item):
    from clip_client.cli import main

    assert main(["build", "--weights", str(weights("clip")), "--repository", str(tmp_path / "r"), "--limit", item]) == 2


def test_tuning_knobs_reach_the_configs(weights):
    manifest = json.loads((weights("clip") / "manifest.json").read_text())
    configs = generate_configs(manifest, limits={"pad_to_multiple_of": "8", "default_top_k": 3, "decode_threads": 0,
                                                 "jpeg_draft_gap": 4, "allowed_formats": ["png", "JPG"]})
    text = read_parameters({"parameters": _parameters_of(configs["preprocess_text"])}, ["pad_to_multiple_of"])
    assert text == {"pad_to_multiple_of": 8}  # the --limit wins over the manifest's 16
    image = read_parameters({"parameters": _parameters_of(configs["preprocess_image"])},
                            ["decode_threads", "jpeg_draft_gap", "allowed_formats"])
    assert image == {"decode_threads": 0, "jpeg_draft_gap": 4.0, "allowed_formats": ["png", "JPG"]}
    post = read_parameters({"parameters": _parameters_of(configs["postprocess"])}, ["default_top_k", "logit_scale"])
    assert post == {"default_top_k": 3, "logit_scale": manifest["logit_scale"]}


def test_read_parameters_defaults_and_errors():
    p = read_parameters({"parameters": {}}, ["max_length", "allowed_formats"])
    assert p == {"max_length": 77, "allowed_formats": ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"]}
    with pytest.raises(ValueError, match="max_length"):
        read_parameters({"parameters": {"max_length": {"string_value": "many"}}}, ["max_length"])


def test_backend_dir_is_ours(tmp_path):
    root = assemble_backend_dir(tmp_path)
    assert (root / "python" / "libtriton_python.so").is_file()
    assert (root / "python" / "triton_python_backend_stub").is_file()
    assert (root / "pytorch" / "model.py").is_file()
    assert assemble_backend_dir(tmp_path) == root  # cached by content
