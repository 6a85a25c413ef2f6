"""postprocess: TEXT_EMBEDS [T, D], IMAGE_EMBEDS [I, D], TOP_K [1] -> logits, probs and top-k (zero_shot).

The embeddings are echoed as TEXT_EMBEDS_OUT / IMAGE_EMBEDS_OUT: in Triton 2.51 an ensemble output that also feeds
another step breaks requests asking for a subset of outputs, so zero_shot takes its embeddings from here.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from clip_common.contract import Postprocess as M
from clip_runtime.batching import execute_each
from clip_runtime.errors import InvalidInputError
from clip_runtime.params import read_parameters
from clip_runtime.postprocess import zero_shot

PARAMS = ("logit_scale", "logit_bias", "scoring", "default_top_k", "max_items_per_request")
OUTPUTS = {  # model output -> key of zero_shot()'s result
    M.LOGITS_PER_IMAGE: "logits_per_image",
    M.LOGITS_PER_TEXT: "logits_per_text",
    M.PROBS: "probs",
    M.TOPK_TEXTS: "topk_texts",
    M.TOPK_IMAGES: "topk_images",
}


class TritonPythonModel:
    """max_batch_size 0: each request is one (T texts, I images) problem."""

    def initialize(self, args):
        self.logger = pb_utils.Logger
        p = read_parameters(args["model_config"], PARAMS)
        self.logit_scale = p["logit_scale"]
        self.logit_bias, self.scoring = p["logit_bias"], p["scoring"]
        self.default_k = p["default_top_k"]
        self.max_items = p["max_items_per_request"]  # T and I each: the cost is T x I, checked before computing

    def execute(self, requests):
        return execute_each(pb_utils, requests, self._one, what="postprocess", logger=self.logger)

    def _one(self, request):
        text = pb_utils.get_input_tensor_by_name(request, M.TEXT_EMBEDS).as_numpy()  # (T, D)
        image = pb_utils.get_input_tensor_by_name(request, M.IMAGE_EMBEDS).as_numpy()  # (I, D)
        k_tensor = pb_utils.get_input_tensor_by_name(request, M.TOP_K)
        for what, n in (("text", len(text)), ("image", len(image))):
            if n > self.max_items:
                raise InvalidInputError(
                    f"{n} {what} embeddings in one request, more than the limit of {self.max_items}"
                )
        k = int(k_tensor.as_numpy().reshape(-1)[0]) if k_tensor is not None else self.default_k
        if k < 1:
            raise InvalidInputError(f"top_k must be >= 1, got {k}")
        if text.shape[-1] != image.shape[-1]:
            raise InvalidInputError(f"embedding sizes differ: text {text.shape}, image {image.shape}")
        result = zero_shot(text, image, self.logit_scale, k, logit_bias=self.logit_bias, scoring=self.scoring)
        tensors = [
            pb_utils.Tensor(M.TEXT_EMBEDS_OUT, np.ascontiguousarray(text, dtype=np.float32)),
            pb_utils.Tensor(M.IMAGE_EMBEDS_OUT, np.ascontiguousarray(image, dtype=np.float32)),
        ]
        return tensors + [pb_utils.Tensor(name, np.ascontiguousarray(result[key])) for name, key in OUTPUTS.items()]
