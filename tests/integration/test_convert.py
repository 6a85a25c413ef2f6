"""`clip-triton convert` on random checkpoints: towers, manifest integrity, strict key mapping, pickle refusal, the
CLI (the Parquet format alone: tests/unit/test_weights_format.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from clip_build.convert import ConvertError, KeyMappingError, convert
from clip_build.export import build_image_encoder, build_text_encoder
from clip_build.weights import (
    WeightsFormatError,
    WeightsIntegrityError,
    compute_model_id,
    load_manifest,
    open_tower,
)
from clip_client.cli import main as cli_main


# ------------------------------------------------------------------------------------------------ towers
def test_towers_are_split(weights):
    w = weights("clip")
    text, vision = open_tower(w, "text"), open_tower(w, "vision")
    assert all(n.startswith(("text.", "text_projection")) for n in text.names())
    assert all(n.startswith(("vision.", "visual_projection")) for n in vision.names())
    assert text.metadata["tower"] == "text" and text.metadata["family"] == "clip"
    # no source path in the metadata: paths would leak into model_id
    assert vision.metadata["config"]["image_size"] == 32 and "source" not in vision.metadata


# ------------------------------------------------------------------------------------------------ manifest
def test_model_id_comes_from_content_not_from_the_typed_path(checkpoints, tmp_path, monkeypatch):
    """The same checkpoint converted through a relative and an absolute path (and a copy elsewhere) has one id."""
    src = checkpoints("clip")
    copy = shutil.copytree(src, tmp_path / "elsewhere" / "ckpt")
    monkeypatch.chdir(src.parent)
    rel = convert(src.name, tmp_path / "rel")
    absolute = convert(str(src.resolve()), tmp_path / "abs")
    moved = convert(str(copy), tmp_path / "copy")
    assert rel["source"]["text"] == src.name and absolute["source"]["text"] == str(src.resolve())  # provenance kept
    assert rel["model_id"] == absolute["model_id"] == moved["model_id"]
    assert rel["files"] == absolute["files"]
    # and different weights still get a different id
    sd = load_file(copy / "model.safetensors")
    sd["visual_projection.weight"] = sd["visual_projection.weight"] + 1
    save_file(sd, copy / "model.safetensors")
    assert convert(str(copy), tmp_path / "changed")["model_id"] != rel["model_id"]


@pytest.mark.parametrize("family", ["clip", "chinese_clip", "bert_vit"])
def test_manifest_contents(weights, family):
    w = weights(family)
    m = load_manifest(w)
    assert m["format_version"] == 1 and m["family"] == family
    assert m["model_id"] == compute_model_id(m["files"]) and len(m["model_id"]) == 16
    assert {"text.parquet", "vision.parquet", "tokenizer/tokenizer.json", "preprocessor_config.json"} <= set(m["files"])
    assert m["text"]["pooling"] == {"clip": "eot", "chinese_clip": "cls", "bert_vit": "mean"}[family]
    assert m["text"]["arch"] == ("clip_text" if family == "clip" else "bert") and m["vision"]["arch"] == "vit"
    assert isinstance(m["logit_scale"], float) and m["projection_dim"] == 24
    img = m["image"]
    assert img["size"] == img["crop_size"] == 32 and len(img["mean"]) == len(img["std"]) == 3
    assert img["resample"] == 3 and abs(img["rescale_factor"] - 1 / 255) < 1e-12
    tok = m["tokenizer"]
    assert tok["dir"] == "tokenizer" and (w / "tokenizer" / "tokenizer.json").is_file()
    assert tok["pad_token_id"] == (49407 if family == "clip" else 0)
    assert tok["max_length"] == {"clip": 77, "chinese_clip": 52, "bert_vit": 64}[family]
    if family == "bert_vit":  # no --projections: loud warning recorded in the manifest
        assert len(m["warnings"]) == 1 and "RANDOMLY" in m["warnings"][0]
    else:
        assert m["warnings"] == []


def test_chinese_clip_preprocessor_is_the_real_layout(checkpoints, weights):
    """Real OFA-Sys Chinese-CLIP: size {height, width}, no center crop -> an exact resize, not a shortest edge."""
    raw = json.loads((checkpoints("chinese_clip") / "preprocessor_config.json").read_text())
    assert raw["image_processor_type"] == "ChineseCLIPImageProcessor" and raw["do_center_crop"] is False
    assert raw["size"] == {"height": 32, "width": 32} and raw["crop_size"] == 32
    img = load_manifest(weights("chinese_clip"))["image"]
    assert img["resize_mode"] == "exact" and img["resize_size"] == 32 and img["shortest_edge"] is None
    assert img["do_center_crop"] is False and img["size"] == 32
    clip = load_manifest(weights("clip"))["image"]
    assert clip["resize_mode"] == "shortest_edge" and clip["shortest_edge"] == 32 and clip["do_center_crop"] is True


def _with_preprocessor(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "preprocessor_config.json").read_text())
    cfg.update(changes)
    (dst / "preprocessor_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"size": {"height": 32, "width": 40}}, "not square"),
        ({"size": {"height": 48, "width": 48}}, "does not match the vision tower's image_size 32"),
        ({"size": {"shortest_edge": 32}}, "do_center_crop=false.*not be square"),
        ({"size": {"shortest_edge": 32, "longest_edge": 64}, "do_center_crop": True}, "not supported"),
    ],
)
def test_unsupported_image_sizes_are_refused(checkpoints, tmp_path, changes, match):
    ck = _with_preprocessor(checkpoints("chinese_clip"), tmp_path / "ck", **changes)
    with pytest.raises(ConvertError, match=match):
        convert(str(ck), tmp_path / "out")


def test_do_resize_false_is_refused(checkpoints, tmp_path):
    ck = _with_preprocessor(checkpoints("clip"), tmp_path / "ck", do_resize=False)
    with pytest.raises(ConvertError, match="do_resize=false is not supported"):
        convert(str(ck), tmp_path / "out")


def test_processing_flags_recorded(checkpoints, tmp_path):
    ck = _with_preprocessor(
        checkpoints("clip"), tmp_path / "ck", do_normalize=False, do_rescale=False, do_convert_rgb=False
    )
    m = convert(str(ck), tmp_path / "out")
    assert (m["image"]["do_normalize"], m["image"]["do_rescale"], m["image"]["do_convert_rgb"]) == (False, False, False)
    assert len(m["warnings"]) == 1 and "do_convert_rgb=false" in m["warnings"][0]


def test_exact_resize_with_center_crop(checkpoints, tmp_path):
    ck = _with_preprocessor(
        checkpoints("chinese_clip"),
        tmp_path / "ck",
        size={"height": 40, "width": 40},
        do_center_crop=True,
        crop_size={"height": 32, "width": 32},
    )
    img = convert(str(ck), tmp_path / "out")["image"]
    assert (img["resize_mode"], img["resize_size"], img["crop_size"], img["do_center_crop"]) == ("exact", 40, 32, True)


def test_convert_is_deterministic(checkpoints, weights, tmp_path):
    m = convert(str(checkpoints("clip")), tmp_path / "again")
    assert m["model_id"] == load_manifest(weights("clip"))["model_id"]


def test_sha256_mismatch_stops_loading(weights, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(weights("clip"), w)
    data = bytearray((w / "vision.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (w / "vision.parquet").write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError, match="vision.parquet"):
        load_manifest(w)
    with pytest.raises(WeightsIntegrityError):
        build_image_encoder(w)
    build_text_encoder(w)  # the text encoder reads (and verifies) text.parquet only
    load_manifest(w, verify=False)


def test_integrity_other_cases(weights, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(weights("clip"), w)
    (w / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(WeightsIntegrityError, match="missing"):
        load_manifest(w)
    shutil.rmtree(w)
    shutil.copytree(weights("clip"), w)
    m = json.loads((w / "manifest.json").read_text())
    m["model_id"] = "0" * 16
    (w / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(WeightsIntegrityError, match="model_id"):
        load_manifest(w)
    m["format_version"] = 99
    (w / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(WeightsFormatError, match="format_version"):
        load_manifest(w)
    with pytest.raises(WeightsFormatError, match="no manifest.json"):
        load_manifest(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------ strict mapping
def _edited_checkpoint(src, dst, edit):
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"))
    return dst


def test_missing_tensor_is_an_error(checkpoints, tmp_path):
    key = "text_model.encoder.layers.1.mlp.fc2.weight"
    ck = _edited_checkpoint(checkpoints("clip"), tmp_path / "ck", lambda sd: sd.pop(key))
    with pytest.raises(KeyMappingError, match=f"missing: {key}"):
        convert(str(ck), tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_wrong_shape_is_an_error(checkpoints, tmp_path):
    key = "vision_model.embeddings.position_embedding.weight"
    ck = _edited_checkpoint(checkpoints("clip"), tmp_path / "ck", lambda sd: sd.update({key: torch.zeros(5, 64)}))
    with pytest.raises(KeyMappingError, match="wrong shape: vision_model.embeddings.position_embedding"):
        convert(str(ck), tmp_path / "out")


def test_extra_tensor_is_an_error_unless_ignored(checkpoints, tmp_path):
    ck = _edited_checkpoint(
        checkpoints("chinese_clip"),
        tmp_path / "ck",
        lambda sd: sd.update({"text_model.surprise.weight": torch.zeros(2)}),
    )
    with pytest.raises(KeyMappingError, match="unexpected tensor.*text_model.surprise.weight"):
        convert(str(ck), tmp_path / "out")
    ok = _edited_checkpoint(
        checkpoints("chinese_clip"),
        tmp_path / "ck2",
        lambda sd: sd.update(
            {
                "text_model.embeddings.position_ids": torch.arange(64)[None],
                "text_model.pooler.dense.weight": torch.zeros(48, 48),
                "text_model.pooler.dense.bias": torch.zeros(48),
            }
        ),
    )
    convert(str(ok), tmp_path / "out2")  # documented ignore-list: buffers and the unused BERT pooler


def test_projection_file_checked(checkpoints, tmp_path):
    save_file({"text_projection.weight": torch.zeros(24, 39)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(KeyMappingError, match="wrong shape"):
        convert(str(checkpoints("bert")), tmp_path / "o", str(checkpoints("clip")), str(tmp_path / "bad.safetensors"))
    save_file({"text_projection.weight": torch.zeros(24, 40), "other": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(KeyMappingError, match="other"):
        convert(str(checkpoints("bert")), tmp_path / "o", str(checkpoints("clip")), str(tmp_path / "x.safetensors"))


def test_family_errors(checkpoints, tmp_path):
    with pytest.raises(ConvertError, match="--vision-checkpoint"):
        convert(str(checkpoints("bert")), tmp_path / "o")
    with pytest.raises(ConvertError, match="only to a BERT"):
        convert(str(checkpoints("clip")), tmp_path / "o", vision_checkpoint=str(checkpoints("clip")))
    with pytest.raises(ConvertError, match="expected clip"):
        convert(str(checkpoints("bert")), tmp_path / "o", vision_checkpoint=str(checkpoints("bert")))


# ------------------------------------------------------------------------------------------------ pickle
def test_pickle_refused_unless_allowed(checkpoints, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(checkpoints("clip"), ck)
    torch.save(load_file(str(ck / "model.safetensors")), ck / "pytorch_model.bin")
    (ck / "model.safetensors").unlink()
    with pytest.raises(ConvertError, match="--allow-pickle"):
        convert(str(ck), tmp_path / "o")
    m = convert(str(ck), tmp_path / "o", allow_pickle=True)
    assert m["family"] == "clip"


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_convert(checkpoints, tmp_path, caplog):
    assert (
        cli_main(
            [
                "convert",
                "--checkpoint",
                str(checkpoints("bert")),
                "--vision-checkpoint",
                str(checkpoints("clip")),
                "--out",
                str(tmp_path / "w"),
            ]
        )
        == 0
    )
    assert load_manifest(tmp_path / "w")["family"] == "bert_vit"
    assert any("RANDOMLY" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert cli_main(["convert", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
