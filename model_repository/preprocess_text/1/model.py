"""preprocess_text: TEXT bytes [N, 1] -> INPUT_IDS int64 [N, L] (padded to the execute's longest text) and LENGTHS
int64 [N, 1] (tokens per row): text_encoder batches rows of any length together (ragged input_ids). Per request also
TOKEN_COUNTS int32 [n] (non-padding tokens of each text) and MODEL_ID [1] (encode_text's token_counts and model_id)."""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from clip_common.contract import PreprocessText as M
from clip_runtime import params as P
from clip_runtime.batching import execute_batched, request_items
from clip_runtime.params import read_parameters
from clip_runtime.text import decode_texts, load_tokenizer

PARAMS = P.PREPROCESS_TEXT


class TritonPythonModel:
    """Tokenise the texts of all requests together, then split the rows back per request."""

    def initialize(self, args):
        self.logger = pb_utils.Logger
        p = read_parameters(args["model_config"], PARAMS)
        here = os.path.join(args["model_repository"], args["model_version"])
        settings = None
        if p["tokenizer_settings"]:
            with open(os.path.join(here, p["tokenizer_settings"]), encoding="utf-8") as f:
                settings = json.load(f)
        self.tokenizer = load_tokenizer(
            p["tokenizer_kind"], os.path.join(here, p["tokenizer_file"]), p["max_length"], p["pad_token_id"], settings
        )
        self.max_bytes = p["max_text_bytes"]
        self.max_items = p["max_items_per_request"]
        self.model_id = {M.MODEL_ID: np.array([p["model_id"].encode("utf-8")], dtype=np.object_)}  # (1,)

    def execute(self, requests):
        return execute_batched(
            pb_utils,
            requests,
            read=lambda request: request_items(pb_utils, request, M.TEXT, "text", self.max_items),
            prepare=lambda items: decode_texts(items, self.max_bytes),  # str, or the InvalidInputError per item
            compute=self._tokenize,
            label="text",
            logger=self.logger,
            per_request=lambda items: self.model_id,
        )

    def _tokenize(self, texts):
        rows, counts = self.tokenizer.encode_counted(texts)  # one call for the whole execute: (M, L), (M, 1), (M,)
        return {M.INPUT_IDS: rows.ids, M.LENGTHS: rows.lengths, M.TOKEN_COUNTS: counts}
