"""clip_info: the served model's identity and limits as one JSON string (output `info`, BYTES [1]).

Clients read this instead of model configs, so they work when the model-config API is restricted. The JSON is
written by `clip-triton build` into info.json next to this file (see clip_build.repository.info_payload).
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from clip_common.contract import ClipInfo as M


class TritonPythonModel:
    """max_batch_size 0; the optional input `request` is ignored."""

    def initialize(self, args):
        path = os.path.join(args["model_repository"], args["model_version"], "info.json")
        with open(path, "rb") as f:
            self.info = f.read()
        json.loads(self.info)  # a broken file fails the load, not every request

    def execute(self, requests):
        out = np.array([self.info], dtype=np.object_)  # (1,)
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(M.INFO, out)]) for _ in requests]
