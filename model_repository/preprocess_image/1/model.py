"""preprocess_image: IMAGE bytes [N, 1] -> PIXEL_VALUES float32 [N, 3, S, S] (CLIPImageProcessor-exact)."""

import os
import traceback
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from clip_build.runtime.image import ImageConfig, ImagePreprocessor, InvalidInputError
from clip_build.runtime.errors import error_response
from clip_build.runtime.params import read_parameters

PARAMS = ("image_size", "resize_mode", "crop_size", "do_center_crop", "resample", "rescale_factor", "image_mean",
          "image_std", "max_image_bytes", "max_pixels", "allowed_formats", "jpeg_draft_gap", "decode_threads",
          "max_items_per_request")


class TritonPythonModel:
    """Decode every image of every request (thread pool), then normalise them all in one numpy op."""

    def initialize(self, args):
        self.logger = pb_utils.Logger
        p = read_parameters(args["model_config"], PARAMS)
        self.pre = ImagePreprocessor(ImageConfig.from_parameters(p))
        self.max_items = p["max_items_per_request"]
        threads = p["decode_threads"] or min(4, os.cpu_count() or 1)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 1 else None

    def execute(self, requests):
        responses = [None] * len(requests)
        items, spans = [], {}  # all images flattened; request -> (start, end) in items
        for r, request in enumerate(requests):
            images = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)  # (n,)
            if len(images) == 0:
                responses[r] = _error("request has no image")
            elif len(images) > self.max_items:
                responses[r] = _error(f"{len(images)} images in one request, more than the limit of {self.max_items}")
            else:
                spans[r] = (len(items), len(items) + len(images))
                items.extend(images)

        loaded = self.pre.load_many(items, self.pool, catch=Exception)  # uint8 (S, S, 3) or the exception
        for r, (lo, hi) in list(spans.items()):
            for j in range(lo, hi):
                exc = loaded[j]
                if isinstance(exc, InvalidInputError):
                    responses[r] = _error(f"image {j - lo}: {exc}")
                elif isinstance(exc, Exception):
                    self.logger.log_error("".join(traceback.format_exception(exc)))
                    responses[r] = _error(f"image {j - lo}: internal error while preprocessing ({type(exc).__name__})",
                                          invalid_input=False)
                else:
                    continue
                del spans[r]
                break

        if spans:
            good = [loaded[j] for lo, hi in spans.values() for j in range(lo, hi)]
            pixels = self.pre.normalise(np.stack(good))  # (M, 3, S, S), one vectorised op for the whole execute
            start = 0
            for r, (lo, hi) in spans.items():
                out = pixels[start : start + hi - lo]
                start += hi - lo
                responses[r] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("PIXEL_VALUES", out)])
        return responses

    def finalize(self):
        if self.pool is not None:
            self.pool.shutdown(wait=False)


def _error(message: str, invalid_input: bool = True):
    """Failed response for one request (see clip_build.runtime.errors.error_response)."""
    return error_response(pb_utils, message, invalid_input)
