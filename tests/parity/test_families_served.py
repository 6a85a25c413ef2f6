"""Served parity of the model families beyond CLIP: encoded image bytes and texts in through the real Triton server,
embeddings and zero-shot probabilities out, against the reference implementations on the same random weights
(transformers SiglipModel; open_clip_torch 3.3.0 for the open_clip layouts). One server serves every model of one
repository (clip-triton build --weights NAME=DIR ...), so the suite starts it once."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from PIL import Image

from clip_common.contract import EncodeImage, EncodeText, ZeroShot
from tests.integration.triton_helpers import infer, serving
from tests.parity.parity_results import PARITY

MIN_COS = 0.99999
PROB_TOL = 1e-4
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
TEXTS = [
    "a photo of a cat",
    "A Photo of a CAT, sitting!",
    "",
    "two dogs playing in the park with a ball " * 6,
    "ein foto einer katze äöü ß",
    "</s> a special token in the text",
    "the astronaut 🚀 floats",
]


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([128 + 100 * np.sin(7 * x + seed), 128 + 90 * np.cos(9 * y * x), 128 + 60 * np.sin(5 * y)], -1)
    return (img + rng.normal(0, 10, (h, w, 3))).clip(0, 255).astype(np.uint8)


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


IMAGES = [
    _encoded(_photo(h, w, s), fmt)
    for s, (h, w, fmt) in enumerate(
        [(64, 64, "PNG"), (120, 80, "JPEG"), (45, 200, "PNG"), (301, 300, "PNG"), (33, 40, "JPEG")]
    )
]


# Tiny open_clip configs in open_clip's own format: GELU vs QuickGELU, class-token vs average pooling, ln_pre or not,
# image sizes 48 and 64, longest (padded) vs squash vs shortest-edge + center crop, bicubic vs bilinear.
OC_GELU = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 48, "layers": 2, "width": 64, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
OC_GELU_PRE = {
    "mean": [0.5, 0.4, 0.3],
    "std": [0.2, 0.25, 0.3],
    "interpolation": "bicubic",
    "resize_mode": "longest",
    "fill_color": 0,
}  # the training checkpoint (oc-epoch) is served with open_clip's defaults: shortest
OC_QUICK = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {
        "image_size": 64,
        "layers": 2,
        "width": 48,
        "patch_size": 16,
        "head_width": 12,
        "pool_type": "avg",
        "no_ln_pre": True,
    },
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "proj_bias": True},
}
OC_QUICK_PRE = {"interpolation": "bilinear", "resize_mode": "squash"}


def _oc_hf() -> dict:
    """open_clip's own towers with a Hugging Face tokenizer (hf_tokenizer_name: here a local folder, the real
    WordPiece vocabulary of all-MiniLM-L6-v2), pooled at its [SEP] (pool_type eos)."""
    from clip_build.synthetic import minilm_dir

    return {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {
            "context_length": 24,
            "vocab_size": 30522,
            "width": 32,
            "heads": 2,
            "layers": 1,
            "hf_tokenizer_name": str(minilm_dir()),
            "pool_type": "eos",
            "eos_id": 102,
        },
    }


def _training_checkpoint(tmp: Path, hub: Path) -> tuple[Path, Path]:
    """open_clip's training output for the OC_GELU model: epoch_3.pt {"epoch", "state_dict" with `module.` keys}
    and the model config as a JSON file (what --model-config takes)."""
    from safetensors.torch import load_file

    sd = load_file(str(hub / "open_clip_model.safetensors"))
    torch.save(
        {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()}}, str(tmp / "epoch_3.pt")
    )
    (tmp / "model.json").write_text(json.dumps(OC_GELU))
    return tmp / "epoch_3.pt", tmp / "model.json"


@pytest.fixture(scope="module")
def family_server(tmp_path_factory, checkpoints):
    """One repository with every family model of this file, served once: (server, {name: (checkpoint, weights)})."""
    from transformers import AutoTokenizer

    from clip_build.convert import convert
    from clip_build.repository import BuildOptions, build_repositories
    from tests.parity.open_clip_reference import save_hub_folder

    tmp = tmp_path_factory.mktemp("families")
    models = {
        "siglip": checkpoints("siglip"),
        "oc-gelu": save_hub_folder(tmp / "oc-gelu", OC_GELU, OC_GELU_PRE, seed=1),
        "oc-quick": save_hub_folder(tmp / "oc-quick", OC_QUICK, OC_QUICK_PRE, seed=2, safetensors=False),
        "oc-hf": save_hub_folder(tmp / "oc-hf", _oc_hf(), {}, seed=3),
    }
    # a hub folder of an hf_tokenizer_name model holds that tokenizer's files (open_clip's local-dir loads them)
    AutoTokenizer.from_pretrained(_oc_hf()["text_cfg"]["hf_tokenizer_name"]).save_pretrained(str(models["oc-hf"]))
    epoch, model_json = _training_checkpoint(tmp, models["oc-gelu"])
    # open_clip's reference for the training checkpoint: the same weights with open_clip's default preprocessing
    reference_dir = tmp / "oc-epoch-reference"
    reference_dir.mkdir()
    (reference_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": OC_GELU, "preprocess_cfg": {}}))
    (reference_dir / "open_clip_model.safetensors").symlink_to(models["oc-gelu"] / "open_clip_model.safetensors")
    weights = {}
    for name, ckpt in models.items():
        convert(str(ckpt), tmp / f"w-{name}", allow_pickle=name == "oc-quick")
        weights[name] = tmp / f"w-{name}"
    convert(str(epoch), tmp / "w-oc-epoch", allow_pickle=True, model_config=str(model_json))
    weights["oc-epoch"], models["oc-epoch"] = tmp / "w-oc-epoch", reference_dir
    repo = build_repositories([(n, w) for n, w in weights.items()], tmp / "repo", BuildOptions(max_queue_delay_us=500))
    with serving(repo, log_path=tmp / "tritonserver.log", exit_timeout=3) as server:
        yield server, {n: (models[n], weights[n]) for n in models}


def _prefix(name: str) -> str:
    return "" if name == "siglip" else f"{name}__"


def _served(server, name: str) -> dict[str, np.ndarray]:
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=120)
    texts = np.array([[t.encode()] for t in TEXTS], dtype=object)
    images = np.array([[b] for b in IMAGES], dtype=object)
    p = _prefix(name)
    out = infer(client, "http", p + EncodeText.NAME, {EncodeText.TEXT: texts}, [EncodeText.TEXT_EMBEDS])
    out |= infer(client, "http", p + EncodeImage.NAME, {EncodeImage.IMAGE: images}, [EncodeImage.IMAGE_EMBEDS])
    out |= infer(
        client,
        "http",
        p + ZeroShot.NAME,
        {ZeroShot.TEXT: texts, ZeroShot.IMAGE: images},
        [ZeroShot.PROBS, ZeroShot.LOGITS_PER_IMAGE],
    )
    return out


def _cos_min(a: np.ndarray, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(torch.from_numpy(a).double(), b.double(), dim=-1).min())


@torch.no_grad()
def _siglip_reference(ckpt: Path) -> dict[str, torch.Tensor]:
    """transformers as SigLIP is run: padding="max_length", no attention mask, SiglipImageProcessor, sigmoid."""
    from transformers import AutoImageProcessor, AutoTokenizer, SiglipModel

    model = SiglipModel.from_pretrained(str(ckpt)).eval()
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    proc = AutoImageProcessor.from_pretrained(str(ckpt))
    ids = tok(
        TEXTS,
        padding="max_length",
        max_length=model.config.text_config.max_position_embeddings,
        truncation=True,
        return_tensors="pt",
    )["input_ids"]
    pixels = proc([Image.open(io.BytesIO(b)).convert("RGB") for b in IMAGES], return_tensors="pt")["pixel_values"]
    out = model(input_ids=ids, pixel_values=pixels)
    return {
        "text": out.text_embeds,
        "image": out.image_embeds,
        "probs": torch.sigmoid(out.logits_per_image),
        "logits": out.logits_per_image,
        "text_raw": model.get_text_features(input_ids=ids).pooler_output,
        "image_raw": model.get_image_features(pixel_values=pixels).pooler_output,
    }


@pytest.fixture(scope="module")
def siglip_result(family_server):
    server, models = family_server
    return _served(server, "siglip"), _siglip_reference(models["siglip"][0])


def test_siglip_text_embeddings_match_transformers(siglip_result):
    served, ref = siglip_result
    cos = _cos_min(served[EncodeText.TEXT_EMBEDS], ref["text_raw"])
    PARITY["siglip (served)", "text"] = cos
    assert cos >= MIN_COS


def test_siglip_image_embeddings_match_transformers(siglip_result):
    served, ref = siglip_result
    cos = _cos_min(served[EncodeImage.IMAGE_EMBEDS], ref["image_raw"])
    PARITY["siglip (served)", "image"] = cos
    assert cos >= MIN_COS


def test_siglip_zero_shot_is_per_label_sigmoid(siglip_result):
    served, ref = siglip_result
    assert np.abs(served[ZeroShot.PROBS] - ref["probs"].numpy()).max() <= PROB_TOL


@pytest.fixture(scope="module")
def open_clip_results(family_server):
    from tests.parity.open_clip_reference import reference

    server, models = family_server
    return {
        name: (_served(server, name), reference(models[name][0], TEXTS, IMAGES))
        for name in ("oc-gelu", "oc-quick", "oc-epoch", "oc-hf")
    }


@pytest.mark.parametrize("name", ["oc-gelu", "oc-quick", "oc-epoch", "oc-hf"])
def test_open_clip_text_embeddings_match_open_clip(open_clip_results, name):
    served, ref = open_clip_results[name]
    cos = _cos_min(served[EncodeText.TEXT_EMBEDS], ref["text"])
    PARITY[f"{name} (served)", "text"] = cos
    assert cos >= MIN_COS


@pytest.mark.parametrize("name", ["oc-gelu", "oc-quick", "oc-epoch", "oc-hf"])
def test_open_clip_image_embeddings_match_open_clip(open_clip_results, name):
    served, ref = open_clip_results[name]
    cos = _cos_min(served[EncodeImage.IMAGE_EMBEDS], ref["image"])
    PARITY[f"{name} (served)", "image"] = cos
    assert cos >= MIN_COS


@pytest.mark.parametrize("name", ["oc-gelu", "oc-quick", "oc-hf"])
def test_open_clip_zero_shot_probabilities_match(open_clip_results, name):
    served, ref = open_clip_results[name]
    assert np.abs(served[ZeroShot.PROBS] - ref["probs"].numpy()).max() <= PROB_TOL


@pytest.mark.integration  # not parity: uses this module's server (tests/conftest.py)
def test_training_checkpoint_serves_the_same_model_as_its_hub_folder(family_server):
    server, models = family_server
    client = httpclient.InferenceServerClient(server.http_url)
    infos = {
        n: json.loads(infer(client, "http", f"{n}__clip_info", {}, ["info"])["info"].reshape(-1)[0])
        for n in ("oc-gelu", "oc-epoch")
    }
    assert (infos["oc-gelu"]["model_id"], infos["oc-epoch"]["source"]) == (infos["oc-epoch"]["model_id"], "epoch_3.pt")


@pytest.mark.integration  # not parity: uses this module's server (tests/conftest.py)
def test_siglip_clip_info_says_sigmoid(family_server):
    server, models = family_server
    client = httpclient.InferenceServerClient(server.http_url)
    info = json.loads(infer(client, "http", "clip_info", {}, ["info"])["info"].reshape(-1)[0])
    manifest = json.loads((models["siglip"][1] / "manifest.json").read_text())
    assert (info["scoring"], info["logit_bias"], info["family"]) == ("sigmoid", manifest["logit_bias"], "siglip")


@pytest.mark.integration  # not parity: uses this module's server (tests/conftest.py)
def test_unprefixed_clip_info_lists_every_model(family_server):
    server, models = family_server
    client = httpclient.InferenceServerClient(server.http_url)
    info = json.loads(infer(client, "http", "clip_info", {}, ["info"])["info"].reshape(-1)[0])
    ids = {n: json.loads((w / "manifest.json").read_text())["model_id"] for n, (_, w) in models.items()}
    assert [(m["name"], m["prefix"], m["model_id"]) for m in info["models"]] == [
        (n, _prefix(n), ids[n]) for n in ("siglip", "oc-gelu", "oc-quick", "oc-hf", "oc-epoch")
    ]


@pytest.mark.integration  # not parity: uses this module's server (tests/conftest.py)
@pytest.mark.parametrize("name", ["oc-gelu", "oc-quick"])
def test_prefixed_ensembles_answer_their_own_model_id(family_server, name):
    server, models = family_server
    client = httpclient.InferenceServerClient(server.http_url)
    texts = np.array([[b"a cat"]], dtype=object)
    got = infer(client, "http", f"{name}__encode_text", {EncodeText.TEXT: texts}, [EncodeText.MODEL_ID])
    manifest = json.loads((models[name][1] / "manifest.json").read_text())
    assert got[EncodeText.MODEL_ID].tolist() == [manifest["model_id"].encode()]


@pytest.mark.integration  # not parity: uses this module's server (tests/conftest.py)
def test_siglip_token_counts_exclude_the_padding(family_server):
    from transformers import AutoTokenizer

    server, models = family_server
    tok = AutoTokenizer.from_pretrained(str(models["siglip"][0]))
    with warnings.catch_warnings():  # one text already ends in </s>: transformers warns
        warnings.simplefilter("ignore")
        want = [len(ids) for ids in tok(TEXTS, truncation=True, max_length=16)["input_ids"]]
    client = httpclient.InferenceServerClient(server.http_url)
    texts = np.array([[t.encode()] for t in TEXTS], dtype=object)
    got = infer(client, "http", EncodeText.NAME, {EncodeText.TEXT: texts}, [EncodeText.TOKEN_COUNTS])
    assert got[EncodeText.TOKEN_COUNTS].tolist() == want
