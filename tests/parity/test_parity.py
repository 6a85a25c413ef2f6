"""Golden parity of our encoders (eager and TorchScript model.pt) against transformers, for every family (our
encoders against themselves: tests/integration/test_encoders.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from clip_build.convert import convert
from clip_build.export import build_image_encoder, build_text_encoder, export_torchscript
from clip_build.synthetic import minilm_dir
from tests.parity.parity_results import PARITY
from tests.parity.reference import (
    CORPUS,
    cosine_min,
    hf_image_features,
    hf_text_features,
    hf_tokenize,
    ragged_rows_of,
    random_pixels,
    token_rows,
    top1,
)

MIN_COS = 0.99999
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.* deprecation notices


@pytest.fixture(scope="session")
def bert_vit_with_projection(tmp_path_factory, checkpoints):
    """bert_vit WEIGHTS_DIR converted with a known --projections file; returns (dir, projection)."""
    tmp = tmp_path_factory.mktemp("bert_vit_proj")
    hidden = json.loads((checkpoints("bert") / "config.json").read_text())["hidden_size"]
    dim = json.loads((checkpoints("clip") / "config.json").read_text())["projection_dim"]
    proj = torch.randn(dim, hidden, generator=torch.Generator().manual_seed(3)) * hidden**-0.5
    save_file({"text_projection.weight": proj}, str(tmp / "proj.safetensors"))
    out = tmp / "weights"
    convert(str(checkpoints("bert")), out, str(checkpoints("clip")), str(tmp / "proj.safetensors"))
    return out, proj


def _check_family(
    family, weights_dir, text_src, vision_src, projection, tmp_path, n_images=6, texts=CORPUS, label=None
):
    """Compare eager + TorchScript text and image embeddings with transformers; record min cosines."""
    ids, mask = hf_tokenize(weights_dir, texts)
    px = random_pixels(weights_dir, n_images)
    ref_t = hf_text_features(family, text_src, ids, mask, projection)
    ref_i = hf_image_features(vision_src, px, "chinese_clip" if family == "chinese_clip" else "clip")
    te, ie = build_text_encoder(weights_dir), build_image_encoder(weights_dir)
    info_t = export_torchscript(te, tmp_path / "text" / "model.pt")
    info_i = export_torchscript(ie, tmp_path / "image" / "model.pt")
    assert info_t["embed_dim"] == info_i["embed_dim"] == ref_t.shape[1]
    assert [i["name"] for i in info_t["inputs"]] == ["input_ids", "lengths", "widths"]
    assert [i["name"] for i in info_i["inputs"]] == ["pixel_values"]
    ts_t = torch.jit.load(str(tmp_path / "text" / "model.pt"))
    ts_i = torch.jit.load(str(tmp_path / "image" / "model.pt"))
    with torch.no_grad():
        outs = {
            "text (eager)": (ref_t, te(*token_rows(ids, mask))),
            "text (torchscript)": (ref_t, ts_t(*token_rows(ids, mask))),
            "text (ts, ragged)": (ref_t, ts_t(*ragged_rows_of(ids, mask))),
            "image (eager)": (ref_i, ie(px)),
            "image (torchscript)": (ref_i, ts_i(px)),
        }
    label = label or family
    for tower, (ref, ours) in outs.items():
        assert ours.dtype == torch.float32 and ours.shape == ref.shape
        cos = cosine_min(ref, ours)
        PARITY[label, tower] = cos
        print(f"parity {label:<22} {tower:<20} min cosine {cos:.9f}")
        assert cos >= MIN_COS, f"{label} {tower}: min cosine {cos}"
    for eager_t, eager_i in (
        (outs["text (eager)"][1], outs["image (eager)"][1]),
        (outs["text (torchscript)"][1], outs["image (torchscript)"][1]),
    ):
        assert torch.equal(top1(ref_t, ref_i), top1(eager_t, eager_i))
        assert torch.equal(top1(ref_i, ref_t), top1(eager_i, eager_t))


def test_parity_clip(weights, checkpoints, tmp_path):
    _check_family("clip", weights("clip"), checkpoints("clip"), checkpoints("clip"), None, tmp_path)


def test_parity_chinese_clip(weights, checkpoints, tmp_path):
    _check_family(
        "chinese_clip",
        weights("chinese_clip"),
        checkpoints("chinese_clip"),
        checkpoints("chinese_clip"),
        None,
        tmp_path,
    )


def test_chinese_clip_images_end_to_end(weights, checkpoints):
    """Image bytes -> our runtime preprocessing (settings from the manifest, as `build` writes them) -> our encoder,
    vs transformers' ChineseCLIPImageProcessor (PIL backend, from the checkpoint's real-layout preprocessor_config.json)
    -> ChineseCLIPModel.get_image_features, on non-square images."""
    import io

    import transformers
    from PIL import Image

    from clip_build.repository import image_parameters
    from clip_runtime.image import ImageConfig, ImagePreprocessor
    from clip_runtime.params import PARAMETERS

    ck, w = checkpoints("chinese_clip"), weights("chinese_clip")
    proc_cls = getattr(transformers, "ChineseCLIPImageProcessorPil", None) or transformers.ChineseCLIPImageProcessor
    hf_proc = proc_cls.from_pretrained(str(ck))
    manifest = json.loads((w / "manifest.json").read_text())
    params = {n: p.default for n, p in PARAMETERS.items()} | image_parameters(manifest)
    assert params["resize_mode"] == "exact" and params["do_center_crop"] is False
    ours = ImagePreprocessor(ImageConfig.from_parameters(params))
    rng = np.random.default_rng(0)
    items = []
    for h, w_ in ((48, 120), (200, 37), (33, 33), (90, 64)):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w_, 3), dtype=np.uint8)).save(buf, "PNG")
        items.append(buf.getvalue())
    ref_px = hf_proc(images=[Image.open(io.BytesIO(b)) for b in items], return_tensors="pt")["pixel_values"]
    our_px = torch.from_numpy(ours(items))
    assert our_px.shape == ref_px.shape == (4, 3, 32, 32)
    assert (our_px - ref_px).abs().max().item() <= 1 / 255
    with torch.no_grad():
        ref = hf_image_features(ck, ref_px, "chinese_clip")
        got = build_image_encoder(w)(our_px)
    assert cosine_min(ref, got) >= MIN_COS


def test_parity_bert_vit(bert_vit_with_projection, checkpoints, tmp_path):
    out, proj = bert_vit_with_projection
    _check_family("bert_vit", out, checkpoints("bert"), checkpoints("clip"), proj, tmp_path)


def test_parity_bert_vit_real_minilm(tmp_path, checkpoints):
    """The real 384-d all-MiniLM-L6-v2 weights (mean pooling, 256-token limit) + the tiny CLIP ViT."""
    out = tmp_path / "weights"
    dim = json.loads((checkpoints("clip") / "config.json").read_text())["projection_dim"]
    proj = torch.randn(dim, 384, generator=torch.Generator().manual_seed(5)) * 384**-0.5
    save_file({"text_projection.weight": proj}, str(tmp_path / "proj.safetensors"))
    manifest = convert(str(minilm_dir()), out, str(checkpoints("clip")), str(tmp_path / "proj.safetensors"))
    assert manifest["text"]["pooling"] == "mean"
    assert manifest["tokenizer"]["max_length"] == 256  # sentence_bert_config.json's max_seq_length
    assert manifest["warnings"] == []
    _check_family(
        "bert_vit",
        out,
        minilm_dir(),
        checkpoints("clip"),
        proj,
        tmp_path,
        n_images=2,
        texts=CORPUS[:6],
        label="bert_vit (MiniLM-L6)",
    )


@pytest.mark.slow
def test_parity_clip_vit_b32(weights, checkpoints, tmp_path):
    """Full ViT-B/32 size (real openai config, legacy eos_token_id=2 argmax pooling); few inputs."""
    w = weights("clip", "base")
    manifest = json.loads((w / "manifest.json").read_text())
    assert manifest["text"]["config"]["eos_token_id"] == 2 and manifest["projection_dim"] == 512
    assert manifest["image"]["size"] == 224 and manifest["vision"]["config"]["patch_size"] == 32
    _check_family(
        "clip",
        w,
        checkpoints("clip", "base"),
        checkpoints("clip", "base"),
        None,
        tmp_path,
        n_images=2,
        texts=["a photo of a cat", "a diagram", "", "word " * 100],
        label="clip ViT-B/32",
    )
