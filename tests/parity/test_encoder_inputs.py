"""The exported TorchScript text encoders (model.pt, loaded alone as the NGC libtorch backend loads it) never raise on
what a caller may send to the internal text_encoder model: out-of-vocabulary or negative ids, sequences longer than the
position table, empty sequences, a mask of another length. Batch-mates of such rows get their own embedding."""

from __future__ import annotations

import pytest
import torch

from clip_build.export import build_text_encoder, export_torchscript
from tests.parity.test_parity import _tokenize

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.* deprecation notices


@pytest.fixture(scope="module", params=["clip", "chinese_clip", "bert_vit"])
def encoder(request, weights, tmp_path_factory):
    """(TorchScript text encoder, good input_ids, good attention_mask, max positions, vocab) per family."""
    w = weights(request.param)
    path = tmp_path_factory.mktemp(f"ts-{request.param}") / "model.pt"
    eager = build_text_encoder(w)
    export_torchscript(eager, path)
    ids, mask = _tokenize(w, ["a photo of a cat", "two dogs playing in the snow"])
    return torch.jit.load(str(path)).eval(), ids, mask, eager.text.max_positions, eager.text.vocab


def test_bad_rows_do_not_fail_or_change_their_batch_mates(encoder):
    ts, ids, mask, _positions, vocab = encoder
    with torch.no_grad():
        alone = ts(ids, mask)  # (2, D)
        bad = ids.clone()
        bad[0, 1], bad[1, 2] = 10**9, -7  # out of vocabulary, negative
        mixed = ts(torch.cat([ids[:1], bad, ids[1:]]), torch.cat([mask[:1], mask, mask[1:]]))  # (4, D)
        odd_mask = ts(ids, mask * -(10**9))  # any non-zero value means "attend"
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed[0], alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mixed[3], alone[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(odd_mask, alone, atol=1e-5, rtol=1e-4)
    clamped = ids.clone()
    clamped[0, 1], clamped[1, 2] = vocab - 1, 0
    with torch.no_grad():
        torch.testing.assert_close(mixed[1:3], ts(clamped, mask), atol=1e-5, rtol=1e-4)  # ids clamped into range


def test_long_empty_and_mismatched_sequences(encoder):
    ts, ids, mask, positions, _vocab = encoder
    with torch.no_grad():
        long_ids = torch.cat([ids, torch.full((2, 5000), 5)], dim=1)
        long_mask = torch.cat([mask, torch.ones(2, 5000, dtype=torch.int64)], dim=1)
        long_out = ts(long_ids, long_mask)  # capped to the position table: its first `positions` tokens
        torch.testing.assert_close(long_out, ts(long_ids[:, :positions], long_mask[:, :positions]))
        for empty_ids, empty_mask in [(torch.zeros(3, 0, dtype=torch.int64), torch.zeros(3, 0, dtype=torch.int64)),
                                      (torch.zeros(0, 5, dtype=torch.int64), torch.zeros(0, 5, dtype=torch.int64))]:
            assert ts(empty_ids, empty_mask).shape[0] == empty_ids.shape[0]
        short_mask = ts(ids, mask[:, :2])  # a mask shorter than the ids: the rest counts as padding
        padded = torch.zeros_like(mask)
        padded[:, :2] = mask[:, :2]
        torch.testing.assert_close(short_mask, ts(ids, padded))
        assert ts(ids, torch.cat([mask, mask], dim=1)).shape == long_out.shape  # a longer mask is cut
        assert ts(ids, mask[:1]).shape == long_out.shape  # fewer mask rows: the others attend to nothing
    assert torch.isfinite(long_out).all()
