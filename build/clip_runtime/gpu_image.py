"""preprocess_image's GPU path (`clip-triton build --image-decode gpu`): JPEGs decoded by nvJPEG (torchvision), resized
(bicubic, antialiased, shortest edge, as CLIPImageProcessor), center-cropped and normalised on the GPU.

The one clip_runtime module that imports torch: preprocess_image's model imports it only when its config says
image_decode=gpu, so the CPU preprocessors stay torch-free. The limits are checked before anything is decoded, with
the CPU path's messages (bytes, then the header: format, size, pixel cap). Items the GPU does not take go through the
exact CPU path one by one: .npy arrays, formats other than JPEG, JPEGs that are not plain YCbCr (greyscale, CMYK,
Adobe RGB), EXIF-rotated ones, ones not ending in an EOI marker (truncated: the CPU path refuses them), resized images
smaller than the crop, and every JPEG nvJPEG refuses. Pixels differ from the exact path by a few levels (nvJPEG's
IDCT and chroma upsampling, float resampling): the GPU kit measures by how much.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import Executor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import __version__ as torchvision_version
from torchvision.io import ImageReadMode, decode_jpeg

from .errors import InvalidInputError
from .image import NPY_MAGIC, ImagePreprocessor, normalise_lut

EOI = b"\xff\xd9"  # JPEG end-of-image marker
ORIENTATION = 0x0112  # EXIF tag
CHUNK_PIXELS = 64 * 2**20  # decoded pixels per nvJPEG call and per resize call (bounds the GPU memory of a batch)


class GpuDecodeUnavailable(RuntimeError):
    """This process cannot decode on the GPU (no CUDA device for the instance, torchvision without nvJPEG, ...)."""


class GpuImagePreprocessor:
    """Image bytes -> float32 [N, 3, S, S] on `device`, per-item errors as the CPU path (`cpu`) gives them."""

    def __init__(self, cpu: ImagePreprocessor, device: str | torch.device):
        self.cpu = cpu
        self.device = torch.device(device)
        self.lut = torch.from_numpy(normalise_lut(cpu.cfg)).to(self.device).reshape(-1)  # (3 * 256,) float32
        self.offsets = (torch.arange(3, device=self.device) * 256).view(1, 3, 1, 1)  # (1, 3, 1, 1)
        self.routed = {"gpu": 0, "cpu": 0, "refused": 0}  # items per path since start (nvJPEG refusals included)

    @classmethod
    def for_instance(cls, cpu: ImagePreprocessor, kind: str, device_id: int) -> GpuImagePreprocessor:
        """The preprocessor of a KIND_GPU instance, after decoding a probe JPEG there; GpuDecodeUnavailable if not."""
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if kind != "GPU" or device_id >= count:
            raise GpuDecodeUnavailable(
                f"image_decode=gpu needs a KIND_GPU instance on a CUDA device torch can see (instance kind {kind}, "
                f"device {device_id}; torch {torch.__version__} sees {count} CUDA device(s))"
            )
        torch.cuda.set_device(device_id)
        gpu = cls(cpu, torch.device("cuda", device_id))
        probe = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 30, 90)).save(probe, "JPEG")
        try:
            gpu.decode([probe.getvalue()], strict=True)
        except RuntimeError as exc:
            raise GpuDecodeUnavailable(
                f"torchvision {torchvision_version} cannot decode JPEGs on {gpu.device} (nvJPEG): {exc}"
            ) from exc
        return gpu

    # ---- routing (CPU, cheap: headers only)
    def gpu_pixels(self, data: bytes) -> int:
        """The pixels nvJPEG will decode for this item, 0 when the CPU path takes it; InvalidInputError (the CPU
        path's) for a refused size or header."""
        self.cpu.check_bytes(data)
        if data[:6] == NPY_MAGIC:
            return 0
        image = self.cpu.open(data)
        if image.format != "JPEG" or image.mode != "RGB" or image.info.get("adobe_transform") == 0:
            return 0
        if "exif" in image.info and image.getexif().get(ORIENTATION, 1) != 1:
            return 0
        if not data.rstrip(b"\0").endswith(EOI):
            return 0
        width, height = self.cpu.target_size(*image.size)
        crop = self.cpu.cfg.crop_size
        if self.cpu.cfg.do_center_crop and (width < crop or height < crop):
            return 0
        return image.size[0] * image.size[1]

    # ---- GPU steps
    def decode(self, blobs: Sequence[bytes], strict: bool = False) -> list[torch.Tensor | None]:
        """JPEG bytes -> uint8 [3, H, W] on the device, one nvJPEG call; None where nvJPEG refuses (strict: raise)."""
        tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]  # (bytes,) each, writable copies
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            if strict:
                raise
        out: list[torch.Tensor | None] = []
        for tensor in tensors:  # one bad item fails the whole call: find it
            try:
                out.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:
                out.append(None)
        return out

    def resize_crop(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """uint8 [3, H, W] images -> uint8 [3, S, S]: CLIPImageProcessor's resize and center crop, same-size groups
        batched."""
        out: list[torch.Tensor | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(tuple(image.shape[1:]), []).append(i)
        for (height, width), members in groups.items():
            per_call = max(1, CHUNK_PIXELS // (height * width))
            for lo in range(0, len(members), per_call):
                chunk = members[lo : lo + per_call]
                for i, pixels in zip(chunk, self._resize_crop(torch.stack([images[i] for i in chunk]))):
                    out[i] = pixels
        return out

    def _resize_crop(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [n, 3, H, W] (one size) -> uint8 [n, 3, S, S]: Pillow's two passes (width, then height), each
        rounded to 8 bits as Pillow does (one float pass instead: up to 4/255 off; two passes: <= 1/255)."""
        cfg = self.cpu.cfg
        width, height = self.cpu.target_size(batch.shape[3], batch.shape[2])
        x = batch.float()  # (n, 3, H, W)
        for size in ((batch.shape[2], width), (height, width)):
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
            x = x.add_(0.5).floor_().clamp_(0, 255)  # Pillow's 8-bit rounding of each pass
        resized = x.to(torch.uint8)  # (n, 3, h, w)
        if not cfg.do_center_crop:
            return resized
        if cfg.crop_rounding == "round":  # torchvision's CenterCrop (open_clip)
            top, left = int(round((height - cfg.crop_size) / 2.0)), int(round((width - cfg.crop_size) / 2.0))
        else:
            top, left = (height - cfg.crop_size) // 2, (width - cfg.crop_size) // 2
        return resized[:, :, top : top + cfg.crop_size, left : left + cfg.crop_size]  # (n, 3, S, S)

    def normalise(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, S, S] -> float32 [N, 3, S, S] through the CPU path's lookup table (the same float32 values)."""
        return self.lut[batch.long() + self.offsets]  # (N, 3, S, S)

    # ---- what the model calls
    def prepare(self, items: Sequence[bytes], pool: Executor | None = None) -> list:
        """One result per item: uint8 [3, S, S] on the device, or the exception that refuses the item."""
        results: list = [None] * len(items)
        to_gpu: dict[int, int] = {}  # item -> its decoded pixels
        to_cpu: list[int] = []
        for j, data in enumerate(items):
            try:
                pixels = self.gpu_pixels(data)
            except InvalidInputError as exc:
                results[j] = exc
                continue
            if pixels:
                to_gpu[j] = pixels
            else:
                to_cpu.append(j)
        for chunk in _chunks(to_gpu):
            decoded = self.decode([items[j] for j in chunk])
            good = [(j, image) for j, image in zip(chunk, decoded) if image is not None]
            to_cpu += [j for j, image in zip(chunk, decoded) if image is None]
            self.routed["refused"] += len(chunk) - len(good)
            for (j, _), pixels in zip(good, self.resize_crop([image for _, image in good])):
                results[j] = pixels
            self.routed["gpu"] += len(good)
        self.routed["cpu"] += len(to_cpu)
        on_cpu = self.cpu.load_many([items[j] for j in to_cpu], pool, catch=Exception)  # uint8 (S, S, 3) or the error
        for j, array in zip(to_cpu, on_cpu):
            results[j] = (
                array
                if isinstance(array, BaseException)
                else (torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).to(self.device))
            )  # (3, S, S)
        return results

    def finish(self, good: Sequence[torch.Tensor]) -> torch.Tensor:
        """The good items' uint8 [3, S, S] -> float32 [M, 3, S, S] on the device, computed (synchronised) before the
        tensor is handed on (DLPack)."""
        pixels = self.normalise(torch.stack(list(good)))  # (M, 3, S, S)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return pixels


def _chunks(pixels: dict[int, int]) -> list[list[int]]:
    """Items (item -> pixels) split into runs whose decoded pixels stay under CHUNK_PIXELS (at least one item each)."""
    chunks: list[list[int]] = []
    total = CHUNK_PIXELS
    for j, n in pixels.items():
        if total + n > CHUNK_PIXELS:
            chunks.append([])
            total = 0
        chunks[-1].append(j)
        total += n
    return chunks
