"""`clip-triton build --dtype auto` builds the dtype clip_build.precision chose (recorded with its reason) and serves
exactly what that dtype's encoders compute in-process."""

from __future__ import annotations

import numpy as np
import torch

from clip_build.export import build_text_encoder
from clip_build.repository import read_info
from clip_client import CLIPClient
from clip_client.cli import main
from clip_runtime.text import TextTokenizer
from tests.integration.triton_helpers import serving


def test_dtype_auto_builds_and_serves_the_chosen_dtype(weights, tmp_path):
    w, repo = weights("clip"), tmp_path / "repo"
    assert main(["build", "--weights", str(w), "--repository", str(repo), "--dtype", "auto"]) == 0
    info = read_info(repo)
    choice = info["dtype_choice"]
    assert choice["requested"] == "auto" and choice["reason"] and info["dtype"] == choice["dtype"]
    texts = ["a photo of a cat", "two dogs", "a diagram"]
    tok = TextTokenizer(
        w / "tokenizer" / "tokenizer.json", info["tokenizer"]["max_length"], info["tokenizer"]["pad_token_id"]
    )
    with torch.no_grad():
        rows = tok.encode_batch(texts)
        expected = build_text_encoder(w, info["dtype"])(
            *(torch.from_numpy(getattr(rows, n)) for n in ("ids", "lengths", "widths"))
        ).numpy()
    with (
        serving(repo, log_path=tmp_path / "tritonserver.log", exit_timeout=3) as server,
        CLIPClient(server.grpc_url) as client,
    ):
        served = client.encode_text(texts, normalize=False)
    np.testing.assert_allclose(served, expected, rtol=1e-3, atol=1e-4)
