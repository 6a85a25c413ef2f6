"""preprocess_image: IMAGE bytes [N, 1] -> PIXEL_VALUES float32 [N, 3, S, S] (CLIPImageProcessor-exact), or, with
image_decode=gpu, decoded by nvJPEG and resized on the GPU, the pixels handed on on the GPU (clip_runtime.gpu_image)."""

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from clip_common.contract import PreprocessImage as M
from clip_runtime import params as P
from clip_runtime.batching import execute_batched, request_items
from clip_runtime.image import ImageConfig, ImagePreprocessor
from clip_runtime.memory import TRIM_ROWS, malloc_trim
from clip_runtime.params import read_parameters

PARAMS = P.PREPROCESS_IMAGE


class TritonPythonModel:
    """Decode and normalise every image of every request in a thread pool, then stack them once."""

    def initialize(self, args):
        self.logger = pb_utils.Logger
        p = read_parameters(args["model_config"], PARAMS)
        self.pre = ImagePreprocessor(ImageConfig.from_parameters(p))
        self.max_items = p["max_items_per_request"]
        self.model_id = {M.MODEL_ID: np.array([p["model_id"].encode("utf-8")], dtype=np.object_)}  # (1,)
        threads = p["decode_threads"] or min(4, os.cpu_count() or 1)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 1 else None
        self.gpu = _gpu_path(self.pre, args) if p["image_decode"] == "gpu" else None
        self.trim = malloc_trim()

    def execute(self, requests):
        def read(request):
            return request_items(pb_utils, request, M.IMAGE, "image", self.max_items)

        if self.gpu is not None:
            return execute_batched(
                pb_utils,
                requests,
                read=read,
                prepare=lambda items: self.gpu.prepare(items, self.pool),  # uint8 (3, S, S) on the GPU, or the error
                compute=lambda good: {M.PIXEL_VALUES: self.gpu.finish(good)},  # (M, 3, S, S) on the GPU
                tensor=pb_utils.Tensor.from_dlpack,
                label="image",
                logger=self.logger,
                per_request=lambda items: self.model_id,
            )
        stacked = 0

        def stack(good: list) -> dict:
            nonlocal stacked
            stacked += len(good)
            return {M.PIXEL_VALUES: np.stack(good)}  # (M, 3, S, S)

        responses = execute_batched(
            pb_utils,
            requests,
            read=read,
            # float32 (3, S, S) normalised, or the error: decoding and lookups run in the pool (they release the GIL)
            prepare=lambda items: self.pre.load_many(items, self.pool, catch=Exception, normalised=True),
            compute=stack,
            label="image",
            logger=self.logger,
            per_request=lambda items: self.model_id,
        )
        if stacked > TRIM_ROWS and self.trim is not None:
            self.trim(0)  # the decode threads' buffers of a bulk batch (measured: ~30 MB kept otherwise)
        return responses

    def finalize(self):
        if self.pool is not None:
            self.pool.shutdown(wait=False)


def _gpu_path(pre, args):
    """image_decode=gpu: the GPU preprocessor of this instance (torch and torchvision are imported here only)."""
    try:
        from clip_runtime.gpu_image import GpuImagePreprocessor

        gpu = GpuImagePreprocessor.for_instance(
            pre, args.get("model_instance_kind", "CPU"), int(args.get("model_instance_device_id", 0) or 0)
        )
    except (ImportError, RuntimeError) as exc:  # no torch/torchvision, no CUDA device, no nvJPEG
        raise pb_utils.TritonModelException(
            f"{args['model_name']}: image_decode=gpu cannot run here: {type(exc).__name__}: {exc}. It needs torch with "
            "CUDA and torchvision (nvJPEG) in the Python backend's environment and a GPU; or build the repository "
            "with --image-decode cpu"
        ) from None
    pb_utils.Logger.log_info(f"{args['model_name']}: decoding JPEGs with nvJPEG on {gpu.device}")
    return gpu
