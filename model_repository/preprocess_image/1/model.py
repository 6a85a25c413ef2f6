"""preprocess_image: IMAGE bytes [N, 1] -> PIXEL_VALUES float32 [N, 3, S, S] (CLIPImageProcessor-exact)."""

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from clip_common.contract import PreprocessImage as M
from clip_runtime.batching import execute_batched, request_items
from clip_runtime.image import ImageConfig, ImagePreprocessor
from clip_runtime.params import read_parameters

PARAMS = ("image_size", "resize_mode", "crop_size", "do_center_crop", "resample", "rescale_factor", "image_mean",
          "image_std", "max_image_bytes", "max_pixels", "max_aspect_ratio", "allowed_formats", "jpeg_draft_gap",
          "decode_threads", "max_items_per_request")


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
        return execute_batched(
            pb_utils, requests,
            read=lambda request: request_items(pb_utils, request, M.IMAGE, "image", self.max_items),
            prepare=lambda items: self.pre.load_many(items, self.pool, catch=Exception),  # uint8 (S, S, 3) or the error
            compute=lambda good: {M.PIXEL_VALUES: self.pre.normalise(np.stack(good))},  # (M, 3, S, S), one op
            label="image", logger=self.logger)

    def finalize(self):
        if self.pool is not None:
            self.pool.shutdown(wait=False)
