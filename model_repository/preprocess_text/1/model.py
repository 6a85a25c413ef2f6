"""preprocess_text: TEXT bytes [N, 1] -> INPUT_IDS, ATTENTION_MASK int64 [N, L] (one padded length per execute)."""

import os
import traceback

import triton_python_backend_utils as pb_utils

from clip_build.runtime.errors import InvalidInputError, error_response
from clip_build.runtime.params import read_parameters
from clip_build.runtime.text import TextTokenizer, decode_text

PARAMS = ("tokenizer_file", "max_length", "pad_token_id", "pad_to_multiple_of", "max_text_bytes",
          "max_items_per_request")


class TritonPythonModel:
    """Tokenise the texts of all requests together, then split the [N, L] arrays back per request."""

    def initialize(self, args):
        self.logger = pb_utils.Logger
        p = read_parameters(args["model_config"], PARAMS)
        here = os.path.join(args["model_repository"], args["model_version"])
        self.tokenizer = TextTokenizer(os.path.join(here, p["tokenizer_file"]), max_length=p["max_length"],
                                       pad_token_id=p["pad_token_id"], pad_to_multiple_of=p["pad_to_multiple_of"])
        self.max_bytes = p["max_text_bytes"]
        self.max_items = p["max_items_per_request"]

    def execute(self, requests):
        responses = [None] * len(requests)
        texts, spans = [], {}  # all texts flattened; request -> (start, end)
        for r, request in enumerate(requests):
            items = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)  # (n,)
            try:
                if len(items) == 0:
                    raise InvalidInputError("request has no text")
                if len(items) > self.max_items:
                    raise InvalidInputError(f"{len(items)} texts in one request, more than the limit of {self.max_items}")
                decoded = []
                for j, item in enumerate(items):
                    try:
                        decoded.append(decode_text(item, self.max_bytes))
                    except InvalidInputError as exc:
                        raise InvalidInputError(f"text {j}: {exc}") from None
            except InvalidInputError as exc:
                responses[r] = _error(str(exc))
                continue
            spans[r] = (len(texts), len(texts) + len(decoded))
            texts.extend(decoded)

        if spans:
            try:
                ids, mask = self.tokenizer.encode_batch(texts)  # int64 (M, L) each, one call for the whole execute
            except Exception as exc:
                self.logger.log_error(traceback.format_exc())
                for r in spans:
                    responses[r] = _error(f"tokenization failed ({type(exc).__name__})", invalid_input=False)
                return responses
            for r, (lo, hi) in spans.items():
                responses[r] = pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("INPUT_IDS", ids[lo:hi]),
                    pb_utils.Tensor("ATTENTION_MASK", mask[lo:hi]),
                ])
        return responses


def _error(message: str, invalid_input: bool = True):
    """Failed response for one request (see clip_build.runtime.errors.error_response)."""
    return error_response(pb_utils, message, invalid_input)
