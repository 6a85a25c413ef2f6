"""Image bytes -> CLIP pixel values, matching transformers' CLIPImageProcessor (PIL bicubic, center crop, normalise).

Runs inside the Triton python stub: numpy and Pillow only, never torch.
"""

from __future__ import annotations

import io
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

from .errors import InvalidInputError
from .resample import FILTERS, resize_region

ImageFile.LOAD_TRUNCATED_IMAGES = False
# warnings.catch_warnings is not thread-safe (it swaps the global filter list) and items decode in a thread pool.
_OPEN_LOCK = threading.Lock()
NPY_MAGIC = b"\x93NUMPY"
# Pillow resizes the whole image (fast, C) while that costs at most this many pixels (about 32 MB in Pillow's 4 bytes
# per pixel: every photo up to max_pixels); beyond, only the part the center crop keeps is computed (resize_region:
# the same pixels, memory and time bounded by the output). A 1 x 10000 PNG would otherwise grow to 224 x 2,240,000.
FULL_RESIZE_MAX_PIXELS = 8_000_000
_FORMAT_ALIASES = {"JPG": "JPEG", "TIF": "TIFF"}


@dataclass(frozen=True)
class ImageConfig:
    """Preprocessing constants (from the checkpoint's preprocessor_config.json) and input limits."""

    image_size: int = 224  # shortest edge (resize_mode=shortest_edge), square side (exact) or longest edge (longest)
    crop_size: int = 224
    resize_mode: str = "shortest_edge"
    do_center_crop: bool = True
    resample: int = 3  # PIL.Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    max_image_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_aspect_ratio: int = 10_000  # longest side / shortest side
    allowed_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
    jpeg_draft_gap: float = 0.0  # 0 = exact; >0: JPEG DCT-downscale to >= gap x target first (faster, inexact)
    crop_rounding: str = "floor"  # center-crop offset: floor(d / 2) (transformers) | round (torchvision: open_clip)
    pad_fill: int = 0  # longest: the value the square is padded with around the resized image (open_clip fill_color)

    @classmethod
    def from_parameters(cls, p: dict) -> ImageConfig:
        """Build from read_parameters() output."""
        return cls(
            image_size=p["image_size"],
            crop_size=p["crop_size"],
            resize_mode=p["resize_mode"],
            do_center_crop=p["do_center_crop"],
            resample=p["resample"],
            rescale_factor=p["rescale_factor"],
            mean=tuple(p["image_mean"]),
            std=tuple(p["image_std"]),
            max_image_bytes=p["max_image_bytes"],
            max_pixels=p["max_pixels"],
            max_aspect_ratio=p.get("max_aspect_ratio", cls.max_aspect_ratio),
            allowed_formats=tuple(p["allowed_formats"]),
            jpeg_draft_gap=p.get("jpeg_draft_gap", 0.0),
            crop_rounding=p.get("crop_rounding", "floor"),
            pad_fill=p.get("pad_fill", 0),
        )

    @property
    def output_size(self) -> int:
        """Side of the square the encoder receives."""
        return self.crop_size if self.do_center_crop else self.image_size


def normalise_lut(cfg: ImageConfig) -> np.ndarray:
    """[3, 256] float32: uint8 value -> normalised value, computed with transformers' own float32 arithmetic."""
    v = (np.arange(256, dtype=np.float64) * cfg.rescale_factor).astype(np.float32)[None, :]  # (1, 256), as rescale()
    mean = np.asarray(cfg.mean, dtype=np.float32)[:, None]
    std = np.asarray(cfg.std, dtype=np.float32)[:, None]
    return ((v - mean) / std).astype(np.float32)  # (3, 256)


class ImagePreprocessor:
    """Decode, validate, resize and crop single items; normalise whole batches in one numpy op."""

    def __init__(self, cfg: ImageConfig | None = None):
        self.cfg = cfg or ImageConfig()
        if self.cfg.resize_mode not in ("shortest_edge", "exact", "longest"):
            raise ValueError(f"resize_mode must be shortest_edge, exact or longest, not {self.cfg.resize_mode!r}")
        if self.cfg.crop_rounding not in ("floor", "round"):
            raise ValueError(f"crop_rounding must be floor or round, not {self.cfg.crop_rounding!r}")
        if not self.cfg.do_center_crop and self.cfg.resize_mode == "shortest_edge":
            raise ValueError("without a center crop, resize_mode must be exact: the encoder takes a fixed square")
        self.formats = tuple(_FORMAT_ALIASES.get(f.upper(), f.upper()) for f in self.cfg.allowed_formats)
        if not self.formats:
            raise ValueError("allowed_formats is empty")
        if self.cfg.resample not in FILTERS:
            raise ValueError(
                f"resample {self.cfg.resample} is not supported: one of {sorted(FILTERS)} (Pillow's "
                "convolution filters; 0 = nearest is not)"
            )
        if Image.MAX_IMAGE_PIXELS is not None and self.cfg.max_pixels > Image.MAX_IMAGE_PIXELS:
            # our max_pixels is the authority; Pillow's own bomb check would refuse below it
            Image.MAX_IMAGE_PIXELS = self.cfg.max_pixels
        self._lut = normalise_lut(self.cfg)  # (3, 256)

    # ---- single items (may raise InvalidInputError)
    def load(self, data: bytes) -> np.ndarray:
        """Bytes (encoded image or .npy uint8 HxWx3) -> uint8 [S, S, 3] resized and cropped."""
        self.check_bytes(data)
        image = self._from_npy(data) if data[:6] == NPY_MAGIC else self.decode(data)
        return self.resize_crop(image)

    def check_bytes(self, data: bytes) -> None:
        """InvalidInputError for an empty item or one over max_image_bytes."""
        if len(data) == 0:
            raise InvalidInputError("empty image")
        if len(data) > self.cfg.max_image_bytes:
            raise InvalidInputError(f"image is {len(data)} bytes, more than the limit of {self.cfg.max_image_bytes}")

    def decode(self, data: bytes) -> Image.Image:
        """Encoded bytes -> RGB PIL image (EXIF-oriented, alpha on white, 16-bit scaled)."""
        return self.finish(self.open(data))

    def open(self, data: bytes) -> Image.Image:
        """Encoded bytes -> a PIL image whose header was read and checked (format, size, pixel cap), not decoded."""
        try:
            with _OPEN_LOCK, warnings.catch_warnings():  # Image.open only parses the header: cheap to serialise
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data), formats=self.formats)
        except Image.UnidentifiedImageError:
            raise InvalidInputError(
                f"not a decodable image (allowed formats: {', '.join(self.formats)}, or .npy uint8 HxWx3)"
            ) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise InvalidInputError(f"image has too many pixels (limit {self.cfg.max_pixels})") from None
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types for a bad header: one clear error
            raise InvalidInputError(f"cannot read image header: {exc}") from None
        width, height = image.size
        if width <= 0 or height <= 0:
            raise InvalidInputError(f"image has an empty size {width}x{height}")
        if width * height > self.cfg.max_pixels:
            raise InvalidInputError(
                f"image is {width}x{height} = {width * height} pixels, more than the limit of {self.cfg.max_pixels}"
            )
        self._check_aspect(width, height)
        return image

    def finish(self, image: Image.Image) -> Image.Image:
        """A checked, opened image -> decoded RGB (EXIF-oriented, alpha on white, 16-bit scaled)."""
        try:
            if self.cfg.jpeg_draft_gap > 0 and image.format == "JPEG":
                tw, th = self.target_size(*image.size)
                image.draft("RGB", (int(tw * self.cfg.jpeg_draft_gap), int(th * self.cfg.jpeg_draft_gap)))
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            return to_rgb(image)
        except InvalidInputError:
            raise
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt data: Pillow raises many types
            raise InvalidInputError(f"cannot decode {image.format} image: {exc}") from None

    def _from_npy(self, data: bytes) -> Image.Image:
        """.npy bytes -> RGB PIL image; header checked before the array is read."""
        fp = io.BytesIO(data)
        try:
            version = np.lib.format.read_magic(fp)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except Exception as exc:  # noqa: BLE001 - numpy's header parser raises many types
            raise InvalidInputError(f"bad .npy header: {exc}") from None
        if dtype != np.uint8 or len(shape) != 3 or shape[2] != 3:
            raise InvalidInputError(f".npy image must be uint8 with shape (H, W, 3), got {dtype} {tuple(shape)}")
        height, width = int(shape[0]), int(shape[1])
        if height <= 0 or width <= 0:
            raise InvalidInputError(f".npy image has an empty size {tuple(shape)}")
        if height * width > self.cfg.max_pixels:
            raise InvalidInputError(
                f".npy image has {height * width} pixels, more than the limit of {self.cfg.max_pixels}"
            )
        self._check_aspect(width, height)
        fp.seek(0)
        try:
            array = np.load(fp, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - any unreadable .npy body is the caller's bad input
            raise InvalidInputError(f"cannot read .npy image: {exc}") from None
        return Image.fromarray(np.ascontiguousarray(array), "RGB")

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after resizing, exactly as transformers computes it."""
        size = self.cfg.image_size
        if self.cfg.resize_mode == "exact":
            return size, size
        if self.cfg.resize_mode == "longest":  # open_clip's ResizeKeepRatio(longest=1): the long side becomes size
            ratio = max(height / size, width / size)
            return max(1, round(width / ratio)), max(1, round(height / ratio))
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size, int(size * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def _check_aspect(self, width: int, height: int) -> None:
        """Refuse (from the header, before decoding) an image whose long side exceeds max_aspect_ratio x its short."""
        if max(width, height) > self.cfg.max_aspect_ratio * min(width, height):
            raise InvalidInputError(
                f"image is {width}x{height}: its aspect ratio is more than the limit of {self.cfg.max_aspect_ratio}:1"
            )

    def resize_crop(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image -> uint8 [S, S, 3]: PIL resize as transformers does, then center crop."""
        new_w, new_h = self.target_size(*image.size)
        whole = (0, 0, new_w, new_h)
        if self.cfg.resize_mode == "longest":  # then open_clip's CenterCropOrPad: pad to the square, centred
            return _pad_centred(self._resize(image, (new_w, new_h), whole), self.cfg.image_size, self.cfg.pad_fill)
        if not self.cfg.do_center_crop:
            return self._resize(image, (new_w, new_h), whole)
        crop = self.cfg.crop_size
        if self.cfg.crop_rounding == "round" and new_h >= crop and new_w >= crop:  # torchvision's CenterCrop
            top, left = int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))
        else:
            top, left = (new_h - crop) // 2, (new_w - crop) // 2
        if top < 0 or left < 0:  # crop larger than the resized image: transformers zero-pads
            return _center_crop_padded(self._resize(image, (new_w, new_h), whole), crop)
        return self._resize(image, (new_w, new_h), (left, top, left + crop, top + crop))

    def _resize(self, image: Image.Image, size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
        """uint8 (bottom - top, right - left, 3): the box (left, top, right, bottom) of image.resize(size), exactly."""
        (width, height), (new_w, new_h) = image.size, size
        if new_w * new_h + new_w * height + width * new_h <= FULL_RESIZE_MAX_PIXELS:  # Pillow's own, whole
            left, top, right, bottom = box
            return np.asarray(image.resize(size, resample=self.cfg.resample))[top:bottom, left:right]
        return resize_region(np.asarray(image), size, box, self.cfg.resample)  # only the box, same pixels

    def pixels(self, array: np.ndarray) -> np.ndarray:
        """uint8 [S, S, 3] -> float32 [3, S, S], normalised (what load_many(normalised=True) gives per item)."""
        return self.normalise(array[None])[0]

    # ---- batches
    def normalise(self, batch: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] -> float32 [N, 3, S, S]: rescale + normalise as one table lookup per channel."""
        n, h, w, _ = batch.shape
        out = np.empty((n, 3, h, w), dtype=np.float32)  # (N, 3, S, S)
        for c in range(3):
            self._lut[c].take(batch[..., c], out=out[:, c])  # bit-identical to transformers' float32 math
        return out

    def load_many(
        self, items: list[bytes], pool=None, catch: type[BaseException] = InvalidInputError, normalised: bool = False
    ) -> list:
        """load() every item, in `pool` (an Executor) when given (Pillow and numpy's lookups release the GIL);
        `catch`es are returned in place. normalised: each result is pixels(load(item)), float32 [3, S, S]."""

        def one(data: bytes):
            try:
                array = self.load(data)
                return self.pixels(array) if normalised else array
            except catch as exc:
                return exc

        if pool is None or len(items) < 2:
            return [one(b) for b in items]
        return list(pool.map(one, items))

    def __call__(self, items: list[bytes]) -> np.ndarray:
        """Convenience: bytes items -> float32 [N, 3, S, S] (raises on the first bad item)."""
        return self.normalise(np.stack([self.load(b) for b in items]))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: transparency composited on white, 16/32-bit greyscale scaled to 8 bits."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        array = np.asarray(image).astype(np.int64)
        array = np.clip(array, 0, 65535)
        array = ((array * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)
        return Image.fromarray(array, "L").convert("RGB")
    if mode == "F":
        raise InvalidInputError("floating-point images (mode F) are not supported")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")  # same as transformers' convert_to_rgb
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _pad_centred(array: np.ndarray, side: int, fill: int) -> np.ndarray:
    """open_clip's center_crop_or_pad after a longest-edge resize: (h, w, 3) -> (side, side, 3), the image centred
    (left/top padding (side - w) // 2), the rest `fill`."""
    h, w = array.shape[:2]
    h, w = min(h, side), min(w, side)
    canvas = np.full((side, side, 3), fill, dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top : top + h, left : left + w] = array[:h, :w]
    return canvas


def _center_crop_padded(array: np.ndarray, crop: int) -> np.ndarray:
    """transformers' center_crop when the image is smaller than the crop: zero-pad, then crop. (H, W, 3)."""
    h, w = array.shape[:2]
    nh, nw = max(crop, h), max(crop, w)
    canvas = np.zeros((nh, nw, 3), dtype=np.uint8)
    tp, lp = -(-(nh - h) // 2), -(-(nw - w) // 2)  # ceil
    canvas[tp : tp + h, lp : lp + w] = array
    top, left = (h - crop) // 2 + tp, (w - crop) // 2 + lp
    return canvas[max(0, top) : max(0, top) + crop, max(0, left) : max(0, left) + crop]
