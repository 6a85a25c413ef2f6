"""The GPU decode path (clip_runtime.gpu_image) against the exact CPU path, in-process, as JSON on stdout.

    python -m clip_loadtest.gpukit.decode_check --device cuda    # the GPU kit runs this on the device
    python -m clip_loadtest.gpukit.decode_check --device cpu     # anywhere torchvision is installed: the resize,
                                                                 # crop, normalise and routing (libjpeg, no nvJPEG)

Over photo-like JPEGs of several sizes (the load tests' workload) it reports the largest and mean pixel difference
in 1/255 levels (uint8, after resize and crop, before normalising) and in normalised units; items that must fall
back (PNG, .npy, greyscale, EXIF-rotated, truncated JPEGs) must match the exact path bit for bit; bad items must be
refused with the exact path's messages. CI cannot run it (no torchvision there); the kit runs it in a subprocess so
that a crash in nvJPEG cannot take the measurements down with it.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time

import numpy as np
from PIL import Image

from clip_runtime.errors import InvalidInputError
from clip_runtime.image import ImageConfig, ImagePreprocessor

from ..workload import jpeg_images

SIZES = "224x224,320x240,480x640,640x480,1024x768,1920x1080,333x517"


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def fallback_items(seed: int = 5) -> dict[str, bytes]:
    """Items the GPU path must hand to the exact CPU path (results identical to it)."""
    photo = Image.open(io.BytesIO(jpeg_images(1, sizes="400x300", seed=seed)[0])).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    npy = io.BytesIO()
    np.save(npy, np.asarray(photo), allow_pickle=False)
    return {
        "png": _encode(photo, "PNG"),
        "npy": npy.getvalue(),
        "greyscale jpeg": _encode(photo.convert("L"), "JPEG"),
        "exif-rotated jpeg": _encode(photo, "JPEG", exif=exif),
        "cmyk jpeg": _encode(photo.convert("CMYK"), "JPEG"),
    }


def bad_items(max_pixels: int) -> dict[str, bytes]:
    """Items both paths must refuse with the same message."""
    good = jpeg_images(1, sizes="640x480", seed=7)[0]
    big = _encode(Image.new("RGB", (max_pixels // 100 + 1, 100)), "JPEG")
    return {
        "truncated jpeg": good[: len(good) // 2],
        "not an image": b"definitely not an image",
        "empty": b"",
        "over max_pixels": big,
    }


def _exact(cpu: ImagePreprocessor, data: bytes):
    try:
        return cpu.load(data)  # uint8 (S, S, 3)
    except InvalidInputError as exc:
        return exc


def check(device: str, n_images: int = 28, seed: int = 3) -> dict:
    """Pixel differences, routing and error messages of the GPU path vs the exact path on `device`."""
    import torch  # this check needs torch and torchvision, the CPU path does not

    from clip_runtime.gpu_image import GpuImagePreprocessor

    cpu = ImagePreprocessor(ImageConfig(max_pixels=4_000_000))
    gpu = (
        GpuImagePreprocessor.for_instance(cpu, "GPU", torch.cuda.current_device())
        if device == "cuda"
        else GpuImagePreprocessor(cpu, device)
    )
    photos = jpeg_images(n_images, sizes=SIZES, seed=seed)
    named = {**{f"jpeg {i}": b for i, b in enumerate(photos)}, **fallback_items(), **bad_items(cpu.cfg.max_pixels)}
    gpu.prepare(photos[:4])  # warm-up: nvJPEG state, kernels
    started = time.perf_counter()
    results = gpu.prepare(list(named.values()))
    good = [r for r in results if not isinstance(r, BaseException)]
    normalised = gpu.finish(good).cpu().numpy() if good else None  # (M, 3, S, S)
    seconds = time.perf_counter() - started
    out: dict = {
        "device": str(gpu.device),
        "torch": torch.__version__,
        "items": len(named),
        "seconds": round(seconds, 3),
        "routed": dict(gpu.routed),
        "fallback_identical": {},
        "errors_match": {},
    }
    diffs, norm_diffs = [], []
    row = {j: k for k, j in enumerate(j for j, r in enumerate(results) if not isinstance(r, BaseException))}
    for j, ((name, data), result) in enumerate(zip(named.items(), results)):
        exact = _exact(cpu, data)
        if isinstance(exact, BaseException) or isinstance(result, BaseException):
            out["errors_match"][name] = type(exact) is type(result) and str(exact) == str(result)
            continue
        pixels = result.cpu().numpy().transpose(1, 2, 0)  # (S, S, 3) uint8
        diff = np.abs(pixels.astype(np.int16) - exact.astype(np.int16))
        norm = np.abs(normalised[row[j]] - cpu.pixels(exact))
        if name.startswith("jpeg "):
            diffs.append(diff)
            norm_diffs.append(norm)
        else:
            out["fallback_identical"][name] = int(diff.max()) == 0
    stacked = np.stack(diffs) if diffs else np.zeros(1)
    out.update(
        {
            "max_diff_levels": int(stacked.max()),
            "mean_diff_levels": round(float(stacked.mean()), 4),
            "p999_diff_levels": float(np.percentile(stacked, 99.9)),
            "max_diff_normalised": round(float(max(d.max() for d in norm_diffs)), 5) if norm_diffs else 0.0,
            "jpeg_sizes": SIZES,
        }
    )
    out["ok"] = all(out["fallback_identical"].values()) and all(out["errors_match"].values())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clip_loadtest.gpukit.decode_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cuda", help="cuda (nvJPEG) or cpu (torchvision's libjpeg decoder)")
    args = parser.parse_args(argv)
    result = check(args.device)
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
