"""open_clip_torch 3.3.0 as a test-only reference, imported from the pinned wheel (sha256-checked by
clip_build.synthetic.open_clip_wheel) without installing it.

open_clip imports torchvision, which has no CPU build matching this torch here. Where torchvision is missing, a
minimal stand-in provides what open_clip's eval path uses (Resize, CenterCrop, pad, ToTensor, Normalize, Compose on
PIL images, with torchvision's documented semantics: PIL resampling, round((h - th) / 2) crop offsets, constant
padding, /255, (x - m) / s);
the model, its config handling, checkpoint loading and the tokenizer are open_clip's own code.
"""

from __future__ import annotations

import enum
import importlib.machinery
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import torch


def _torchvision_stand_in() -> None:
    """Register a tiny `torchvision` with the PIL transforms open_clip's eval preprocessing calls."""
    from PIL import Image

    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"

    pil = {
        InterpolationMode.NEAREST: Image.NEAREST,
        InterpolationMode.BILINEAR: Image.BILINEAR,
        InterpolationMode.BICUBIC: Image.BICUBIC,
    }

    def resize(img, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
        w, h = img.size
        if isinstance(size, int) or len(size) == 1:
            size = size if isinstance(size, int) else size[0]
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = size, int(size * long / short)
            ow, oh = (new_short, new_long) if w <= h else (new_long, new_short)
        else:
            oh, ow = size
        return img.resize((ow, oh), pil[interpolation])

    def crop(img, top, left, height, width):
        return img.crop((left, top, left + width, top + height))

    def center_crop(img, output_size):
        th, tw = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        w, h = img.size
        if th > h or tw > w:
            raise NotImplementedError("the stand-in does not pad")
        return crop(img, int(round((h - th) / 2.0)), int(round((w - tw) / 2.0)), th, tw)

    def pad(img, padding, fill=0, padding_mode="constant"):
        left, top, right, bottom = padding
        out = Image.new(img.mode, (img.size[0] + left + right, img.size[1] + top + bottom), (fill,) * 3)
        out.paste(img, (left, top))
        return out

    def to_tensor(pic):
        a = np.asarray(pic, dtype=np.uint8)
        return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div(255)

    def get_dimensions(img):
        return [len(img.getbands()), img.size[1], img.size[0]]

    class _T:
        def __init__(self, *args, **kwargs):
            self.args, self.kwargs = args, kwargs

    class Resize(_T):
        def __call__(self, img):
            return resize(img, self.args[0], self.kwargs.get("interpolation", InterpolationMode.BILINEAR))

    class CenterCrop(_T):
        def __call__(self, img):
            return center_crop(img, self.args[0])

    class ToTensor(_T):
        def __call__(self, pic):
            return to_tensor(pic)

    class Normalize(torch.nn.Module):
        def __init__(self, mean, std):
            super().__init__()
            self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

        def forward(self, x):
            return (x - self.mean) / self.std

    class Compose(_T):
        def __call__(self, x):
            for t in self.args[0]:
                x = t(x)
            return x

    class _TrainOnly(_T):
        def __call__(self, *a):
            raise NotImplementedError("training augmentation is not part of the reference")

    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    ops = types.ModuleType("torchvision.ops")
    misc = types.ModuleType("torchvision.ops.misc")
    for name, obj in dict(
        InterpolationMode=InterpolationMode,
        Resize=Resize,
        CenterCrop=CenterCrop,
        ToTensor=ToTensor,
        Normalize=Normalize,
        Compose=Compose,
        RandomResizedCrop=_TrainOnly,
        ColorJitter=_TrainOnly,
        Grayscale=_TrainOnly,
        functional=functional,
    ).items():
        setattr(transforms, name, obj)
    for name, obj in dict(
        resize=resize,
        crop=crop,
        center_crop=center_crop,
        to_tensor=to_tensor,
        pad=pad,
        get_dimensions=get_dimensions,
        InterpolationMode=InterpolationMode,
    ).items():
        setattr(functional, name, obj)
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
    ops.misc, tv.ops, tv.transforms = misc, ops, transforms
    for module in (tv, transforms, functional, ops, misc):
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    sys.modules.update(
        {
            "torchvision": tv,
            "torchvision.transforms": transforms,
            "torchvision.transforms.functional": functional,
            "torchvision.ops": ops,
            "torchvision.ops.misc": misc,
        }
    )


def open_clip():
    """The open_clip package of the pinned wheel (extracted once into clip-triton's cache)."""
    if "open_clip" in sys.modules:
        return sys.modules["open_clip"]
    from clip_build.files import cache_dir
    from clip_build.synthetic import OPEN_CLIP_VERSION, open_clip_wheel

    root = cache_dir() / f"open_clip_torch-{OPEN_CLIP_VERSION}"
    if not (root / "open_clip" / "__init__.py").is_file():
        with zipfile.ZipFile(open_clip_wheel()) as zf:
            zf.extractall(root)
    import transformers.utils.import_utils  # noqa: F401 - decides torchvision's absence before the stand-in exists

    stand_in = False
    try:
        import torchvision  # noqa: F401 - a real one, where it loads, is used as it is
    except Exception:  # noqa: BLE001 - absent, or its compiled ops do not match this torch
        _drop_torchvision()
        _torchvision_stand_in()
        stand_in = True
    sys.path.insert(0, str(root))
    try:
        import open_clip as oc
    finally:
        if stand_in:  # open_clip keeps its references; nothing else may see the stand-in
            _drop_torchvision()
    return oc


def _drop_torchvision() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def save_hub_folder(out: Path, model_cfg: dict, preprocess_cfg: dict, seed: int, safetensors: bool = True) -> Path:
    """A random-weight open_clip model (open_clip's own CLIP class) saved in the hub layout."""
    import json

    oc = open_clip()
    torch.manual_seed(seed)
    model = oc.CLIP(**model_cfg) if not model_cfg.get("custom_text") else oc.CustomTextCLIP(**model_cfg)
    _perturb(model, seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if safetensors:
        from safetensors.torch import save_file

        save_file(sd, str(out / "open_clip_model.safetensors"))
    else:
        torch.save(sd, str(out / "open_clip_pytorch_model.bin"))
    return out


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """LayerNorm weights/biases and biases off their 1/0 init (parity must exercise them)."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim <= 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@torch.no_grad()
def reference(folder: Path, texts: list[str], images: list[bytes]) -> dict[str, torch.Tensor]:
    """open_clip's own create_model_and_transforms + get_tokenizer on `local-dir:FOLDER`: embeddings and zero-shot."""
    import io

    from PIL import Image

    oc = open_clip()
    model, _, preprocess = oc.create_model_and_transforms(f"local-dir:{folder}")
    model.eval()
    tokenizer = oc.get_tokenizer(f"local-dir:{folder}")
    ids = tokenizer(texts)
    pixels = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
    text, image = model.encode_text(ids), model.encode_image(pixels)
    t, i = torch.nn.functional.normalize(text, dim=-1), torch.nn.functional.normalize(image, dim=-1)
    logits = model.logit_scale.exp() * i @ t.T
    if getattr(model, "logit_bias", None) is not None:
        logits = logits + model.logit_bias
        probs = torch.sigmoid(logits)
    else:
        probs = logits.softmax(dim=-1)
    return {"text": text, "image": image, "probs": probs, "ids": ids}
