"""preprocess_text: TEXT bytes [N, 1] -> INPUT_IDS, ATTENTION_MASK int64 [N, L] (one padded length per execute)."""

import os

import triton_python_backend_utils as pb_utils

from clip_common.contract import PreprocessText as M
from clip_runtime.batching import execute_batched, request_items
from clip_runtime.params import read_parameters
from clip_runtime.text import TextTokenizer, decode_texts

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
        return execute_batched(
            pb_utils, requests,
            read=lambda request: request_items(pb_utils, request, M.TEXT, "text", self.max_items),
            prepare=lambda items: decode_texts(items, self.max_bytes),  # str, or the InvalidInputError per item
            compute=self._tokenize,
            label="text", logger=self.logger)

    def _tokenize(self, texts):
        ids, mask = self.tokenizer.encode_batch(texts)  # int64 (M, L) each, one call for the whole execute
        return {M.INPUT_IDS: ids, M.ATTENTION_MASK: mask}
