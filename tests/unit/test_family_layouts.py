"""convert's layout detection and its refusals for the SigLIP and open_clip layouts: each missing or unsupported
part is named (no server needed)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from clip_build.convert import ConvertError, convert
from clip_build.families import open_clip_model_config, open_clip_tower_configs

TINY = {
    "embed_dim": 8,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


def _hub(tmp_path, model_cfg=TINY, preprocess_cfg=None, weights=True):
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}})
    )
    if weights:
        save_file({"logit_scale": torch.ones(())}, str(folder / "open_clip_model.safetensors"))
    return folder


def test_siglip2_naflex_is_refused_naming_what_is_missing(checkpoints, tmp_path):
    folder = tmp_path / "naflex"
    shutil.copytree(checkpoints("siglip"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "siglip2"}))
    with pytest.raises(ConvertError, match="NaFlex.*pixel_attention_mask.*Fixed-resolution SigLIP 2"):
        convert(str(folder), tmp_path / "out")


def test_timm_towers_are_refused_naming_what_is_supported():
    cfg = {**TINY, "vision_cfg": {"timm_model_name": "vit_base_patch16_siglip_224", "image_size": 224}}
    with pytest.raises(ConvertError, match="timm model, not supported.*supported: open_clip's own ViT"):
        open_clip_tower_configs(cfg, "cfg")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"vision_cfg": {**TINY["vision_cfg"], "layers": [3, 4, 6, 3]}}, "ModifiedResNet"),
        ({"text_cfg": {**TINY["text_cfg"], "hf_model_name": "xlm-roberta-base"}}, "Hugging Face encoder"),
        ({"vision_cfg": {**TINY["vision_cfg"], "ls_init_value": 1e-5}}, "ls_init_value"),
        ({"vision_cfg": {**TINY["vision_cfg"], "attentional_pool": True}}, "attentional_pool"),
    ],
)
def test_unsupported_open_clip_towers_are_named(change, message):
    with pytest.raises(ConvertError, match=message):
        open_clip_tower_configs({**TINY, **change}, "cfg")


def test_open_clip_hub_folder_without_weights_names_the_files(tmp_path):
    with pytest.raises(ConvertError, match="open_clip_model.safetensors or open_clip_pytorch_model.bin"):
        convert(str(_hub(tmp_path, weights=False)), tmp_path / "out")


def test_open_clip_hub_unknown_resize_mode_is_refused(tmp_path):
    with pytest.raises(ConvertError, match="resize_mode 'random' not supported"):
        convert(str(_hub(tmp_path, preprocess_cfg={"resize_mode": "random"})), tmp_path / "out")


def test_open_clip_pickle_needs_allow_pickle(tmp_path):
    folder = _hub(tmp_path, weights=False)
    torch.save({"logit_scale": torch.ones(())}, str(folder / "open_clip_pytorch_model.bin"))
    with pytest.raises(ConvertError, match="--allow-pickle"):
        convert(str(folder), tmp_path / "out")


def test_training_checkpoint_needs_a_model_config(tmp_path):
    torch.save({"state_dict": {}}, str(tmp_path / "epoch_1.pt"))
    with pytest.raises(ConvertError, match="give --model-config"):
        convert(str(tmp_path / "epoch_1.pt"), tmp_path / "out", allow_pickle=True)


def test_model_config_by_name_comes_from_open_clip():
    cfg = open_clip_model_config("ViT-B-32-quickgelu")
    assert (cfg["quick_gelu"], cfg["vision_cfg"]["patch_size"], cfg["embed_dim"]) == (True, 32, 512)


def test_unknown_model_config_name_is_refused():
    with pytest.raises(ConvertError, match="not one of open_clip's model configs"):
        open_clip_model_config("ViT-Q-99")


def test_missing_tensor_is_named(tmp_path):
    with pytest.raises(ConvertError, match="missing: token_embedding.weight"):
        convert(str(_hub(tmp_path)), tmp_path / "out")


def test_build_cli_names_each_weights_folder(tmp_path):
    from clip_build.repository import named_weights

    (tmp_path / "My_Weights").mkdir()
    got = named_weights(["siglip=/w/a", str(tmp_path / "My_Weights"), "/w/c"], ["", "", "third"])
    assert got == [
        ("siglip", tmp_path.joinpath("/w/a")),
        ("my-weights", tmp_path / "My_Weights"),
        ("third", tmp_path.joinpath("/w/c")),
    ]


@pytest.mark.integration  # exports TorchScript for two models (no server)
def test_cli_converts_siglip_and_builds_two_models_into_one_repository(checkpoints, weights, tmp_path):
    from clip_client.cli import main

    assert main(["convert", "--checkpoint", str(checkpoints("siglip")), "--out", str(tmp_path / "siglip")]) == 0
    assert (
        main(
            [
                "build",
                "--weights",
                f"clip={weights('clip')}",
                "--weights",
                f"sig-lip={tmp_path / 'siglip'}",
                "--repository",
                str(tmp_path / "repo"),
            ]
        )
        == 0
    )
    info = json.loads((tmp_path / "repo" / "clip_info" / "1" / "info.json").read_text())
    steps = (tmp_path / "repo" / "sig-lip__zero_shot" / "config.pbtxt").read_text()
    assert ([(m["name"], m["prefix"], m["scoring"]) for m in info["models"]], steps.count('"sig-lip__')) == (
        [("clip", "", "softmax"), ("sig-lip", "sig-lip__", "sigmoid")],
        6,
    )  # its name + 5 steps
