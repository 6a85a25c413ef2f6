"""Image preprocessing: pixel parity with transformers' CLIPImageProcessor, sizes, modes, EXIF (the rest of
clip_runtime.image: tests/unit/test_image_load.py)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image, ImageOps

from clip_runtime.image import ImageConfig, ImagePreprocessor
from clip_runtime.params import PARAMETERS
from tests.images import encode, photo

TOL = 1 / 255  # the contract; in practice the values are bit-identical (same PIL resize, same float32 math)


@pytest.fixture(scope="module")
def hf():
    """transformers' processor, factory by (shortest_edge, crop).

    The PIL backend explicitly: transformers 5's `CLIPImageProcessor` is the torchvision backend when torchvision
    is installed (tensor bicubic, not PIL's) and falls back to this one otherwise.
    """
    from transformers import CLIPImageProcessorPil

    def make(size: int = 224, crop: int = 224):
        return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop})

    return make


def reference(hf_proc, data: bytes) -> np.ndarray:
    """What a transformers user gets: PIL open, EXIF transpose, CLIPImageProcessor. (3, S, S)."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf_proc(images=image, return_tensors="np")["pixel_values"][0]


SIZES = [
    (224, 224),
    (300, 400),
    (400, 300),
    (1000, 333),
    (97, 130),
    (50, 50),
    (3, 900),
    (1080, 1920),
    (225, 224),
    (481, 640),
    (2000, 37),
]


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_parity_with_clip_image_processor(hf, h, w, fmt):
    data = encode(Image.fromarray(photo(h, w, seed=h * w)), fmt, **({"quality": 90} if fmt != "PNG" else {}))
    ours = ImagePreprocessor()([data])[0]
    ref = reference(hf(), data)
    assert ours.shape == ref.shape == (3, 224, 224)
    assert ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= TOL


@pytest.mark.parametrize("size,crop", [(32, 32), (256, 224), (224, 256), (64, 48)])
def test_parity_other_sizes_and_small_images_padded(hf, size, crop):
    cfg = ImageConfig(image_size=size, crop_size=crop)
    for h, w in [(40, 90), (500, 300), (20, 20)]:
        data = encode(Image.fromarray(photo(h, w)), "PNG")
        ours = ImagePreprocessor(cfg)([data])[0]
        ref = reference(hf(size, crop), data)
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() <= TOL


def _chinese_clip_processor_class():
    """transformers' ChineseCLIPImageProcessor, PIL backend (transformers 5 names it ...Pil; 4.x has one class)."""
    import transformers

    return getattr(transformers, "ChineseCLIPImageProcessorPil", None) or transformers.ChineseCLIPImageProcessor


@pytest.mark.parametrize("side", [224, 32])
@pytest.mark.parametrize("h,w", [(300, 400), (400, 300), (1000, 333), (3, 900), (1080, 1920), (97, 130), (50, 50)])
def test_parity_with_chinese_clip_exact_resize(h, w, side):
    """Real Chinese-CLIP configs: size {height, width}, no center crop -> resized to exactly side x side."""
    hf_proc = _chinese_clip_processor_class()(
        size={"height": side, "width": side}, crop_size=side, do_center_crop=False
    )
    data = encode(Image.fromarray(photo(h, w, seed=h + w)), "JPEG", quality=90)
    cfg = ImageConfig(image_size=side, crop_size=side, resize_mode="exact", do_center_crop=False)
    ours = ImagePreprocessor(cfg)([data])[0]
    ref = reference(hf_proc, data)
    assert ours.shape == ref.shape == (3, side, side)
    assert np.abs(ours - ref).max() <= TOL


@pytest.mark.parametrize("do_rescale,do_normalize", [(False, True), (True, False), (False, False)])
def test_rescale_and_normalize_flags_follow_the_manifest(do_rescale, do_normalize):
    """A manifest's do_rescale / do_normalize = false reach the runtime (via build's image_parameters) as identity
    steps and give transformers' pixels."""
    from transformers import CLIPImageProcessorPil

    from clip_build.repository import image_parameters

    image = {
        "size": 64,
        "crop_size": 64,
        "shortest_edge": 64,
        "resize_mode": "shortest_edge",
        "resize_size": 64,
        "do_center_crop": True,
        "resample": 3,
        "mean": [0.5, 0.4, 0.3],
        "std": [0.2, 0.25, 0.3],
        "rescale_factor": 1 / 255,
        "do_resize": True,
        "do_rescale": do_rescale,
        "do_normalize": do_normalize,
        "do_convert_rgb": True,
    }
    params = {n: p.default for n, p in PARAMETERS.items()} | image_parameters({"image": image})
    hf_proc = CLIPImageProcessorPil(
        size={"shortest_edge": 64},
        crop_size={"height": 64, "width": 64},
        image_mean=image["mean"],
        image_std=image["std"],
        do_rescale=do_rescale,
        do_normalize=do_normalize,
    )
    for h, w in [(100, 70), (64, 200)]:
        data = encode(Image.fromarray(photo(h, w)), "PNG")
        ours = ImagePreprocessor(ImageConfig.from_parameters(params))([data])[0]
        ref = reference(hf_proc, data).astype(np.float32)
        assert ours.shape == ref.shape == (3, 64, 64)
        scale = 255 if not do_rescale else 1  # unrescaled values are 255x larger; the tolerance is 1/255 of a step
        assert np.abs(ours - ref).max() <= TOL * scale
        assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P_transparent", "P", "L", "1", "CMYK"])
def test_modes_match_transformers_convert_to_rgb(hf, mode):
    rgb = photo(120, 160)
    alpha = np.tile(np.linspace(-255, 255, 160).clip(0, 255).astype(np.uint8), (120, 1))  # left half transparent
    if mode == "RGBA":
        image, fmt = Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG"
    elif mode == "LA":
        image, fmt = Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA"), "PNG"
    elif mode == "P_transparent":
        image = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        image.info["transparency"] = 3
        fmt = "PNG"
    elif mode == "CMYK":
        image, fmt = Image.fromarray(rgb).convert("CMYK"), "JPEG"
    else:
        image, fmt = Image.fromarray(rgb).convert(mode), "PNG"
    data = encode(image, fmt, **({"transparency": 3} if mode == "P_transparent" else {}))
    assert Image.open(io.BytesIO(data)).mode == ("P" if mode.startswith("P") else mode)
    ours = ImagePreprocessor()([data])[0]
    assert np.abs(ours - reference(hf(), data)).max() <= TOL
    if mode in ("RGBA", "LA"):  # the transparent left part is composited on white
        white = (1.0 - np.array(PARAMETERS["image_mean"].default)) / np.array(PARAMETERS["image_std"].default)
        assert np.allclose(ours[:, :, 0], white[:, None], atol=0.05)


def test_16bit_greyscale_is_scaled_not_clipped(hf):
    ramp = np.tile(np.linspace(0, 65535, 300).astype(np.uint16), (200, 1))  # (200, 300)
    data = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    ours = ImagePreprocessor()([data])[0]
    eight = ((ramp.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)  # the 8-bit image it stands for
    ref = reference(hf(), encode(Image.fromarray(eight).convert("RGB"), "PNG"))
    assert np.abs(ours - ref).max() <= TOL
    assert ours.max() - ours.min() > 2  # a plain convert("RGB") clips almost everything to white


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_applied(hf, orientation):
    rgb = photo(90, 160)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(rgb), "JPEG", quality=95, exif=exif.tobytes())
    ours = ImagePreprocessor(ImageConfig(image_size=64, crop_size=64))([data])[0]
    assert np.abs(ours - reference(hf(64, 64), data)).max() <= TOL
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert upright.size == ((90, 160) if orientation in (6, 8) else (160, 90))
