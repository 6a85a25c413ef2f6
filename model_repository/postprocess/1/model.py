"""postprocess: TEXT_EMBEDS [T, D], IMAGE_EMBEDS [I, D], TOP_K [1] -> logits, probs and top-k (zero_shot).

The embeddings are echoed as TEXT_EMBEDS_OUT / IMAGE_EMBEDS_OUT: in Triton 2.51 an ensemble output that also feeds
another step breaks requests asking for a subset of outputs, so zero_shot takes its embeddings from here.
"""

import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

from clip_build.runtime.errors import error_response
from clip_build.runtime.params import read_parameters
from clip_build.runtime.postprocess import zero_shot

PARAMS = ("logit_scale", "default_top_k")
OUTPUTS = {  # model output -> key of zero_shot()'s result
    "LOGITS_PER_IMAGE": "logits_per_image",
    "LOGITS_PER_TEXT": "logits_per_text",
    "PROBS": "probs",
    "TOPK_TEXTS": "topk_texts",
    "TOPK_IMAGES": "topk_images",
}


class TritonPythonModel:
    """max_batch_size 0: each request is one (T texts, I images) problem."""

    def initialize(self, args):
        self.logger = pb_utils.Logger
        p = read_parameters(args["model_config"], PARAMS)
        self.logit_scale = p["logit_scale"]
        self.default_k = p["default_top_k"]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                text = pb_utils.get_input_tensor_by_name(request, "TEXT_EMBEDS").as_numpy()  # (T, D)
                image = pb_utils.get_input_tensor_by_name(request, "IMAGE_EMBEDS").as_numpy()  # (I, D)
                k_tensor = pb_utils.get_input_tensor_by_name(request, "TOP_K")
                k = int(k_tensor.as_numpy().reshape(-1)[0]) if k_tensor is not None else self.default_k
                if k < 1:
                    raise ValueError(f"top_k must be >= 1, got {k}")
                if text.shape[-1] != image.shape[-1]:
                    raise ValueError(f"embedding sizes differ: text {text.shape}, image {image.shape}")
                result = zero_shot(text, image, self.logit_scale, k)
                tensors = [pb_utils.Tensor("TEXT_EMBEDS_OUT", np.ascontiguousarray(text, dtype=np.float32)),
                           pb_utils.Tensor("IMAGE_EMBEDS_OUT", np.ascontiguousarray(image, dtype=np.float32))]
                tensors += [pb_utils.Tensor(name, np.ascontiguousarray(result[key])) for name, key in OUTPUTS.items()]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except ValueError as exc:
                responses.append(_error(str(exc)))
            except Exception as exc:
                self.logger.log_error(traceback.format_exc())
                responses.append(_error(f"postprocess failed ({type(exc).__name__})", invalid_input=False))
        return responses


def _error(message: str, invalid_input: bool = True):
    """Failed response for one request (see clip_build.runtime.errors.error_response)."""
    return error_response(pb_utils, message, invalid_input)
