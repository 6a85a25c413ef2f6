"""The exported TorchScript text encoders (model.pt, loaded alone as the NGC libtorch backend loads it) never raise on
what a caller may send to the internal text_encoder model: out-of-vocabulary or negative ids, rows longer than the
position table, empty rows or batches, lengths and widths that contradict each other or the ids. Batch-mates of such
rows get their own embedding."""

from __future__ import annotations

import pytest
import torch

from clip_build.export import build_text_encoder, export_torchscript
from tests.parity.reference import hf_tokenize, ragged_rows_of, token_rows

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.* deprecation notices


@pytest.fixture(scope="module", params=["clip", "chinese_clip", "bert_vit"])
def encoder(request, weights, tmp_path_factory):
    """(TorchScript text encoder, good ids (2, L), their lengths (2, 1), max positions, vocab) per family."""
    w = weights(request.param)
    path = tmp_path_factory.mktemp(f"ts-{request.param}") / "model.pt"
    eager = build_text_encoder(w)
    export_torchscript(eager, path)
    ids, mask = hf_tokenize(w, ["a photo of a cat", "two dogs playing in the snow"])
    _, lengths, _ = token_rows(ids, mask)
    return torch.jit.load(str(path)).eval(), ids, lengths, eager.text.max_positions, eager.text.vocab


def _width(ids: torch.Tensor) -> torch.Tensor:
    return torch.full((ids.shape[0], 1), ids.shape[1])


def test_bad_ids_do_not_fail_or_change_their_batch_mates(encoder):
    ts, ids, lengths, _positions, vocab = encoder
    with torch.no_grad():
        alone = ts(ids, lengths, _width(ids))  # (2, D)
        bad = ids.clone()
        bad[0, 1], bad[1, 2] = 10**9, -7  # out of vocabulary, negative
        rows = torch.cat([ids[:1], bad, ids[1:]])
        mixed = ts(rows, torch.cat([lengths[:1], lengths, lengths[1:]]), _width(rows))  # (4, D)
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed[0], alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mixed[3], alone[1], atol=1e-5, rtol=1e-4)
    clamped = ids.clone()
    clamped[0, 1], clamped[1, 2] = vocab - 1, 0
    with torch.no_grad():
        torch.testing.assert_close(mixed[1:3], ts(clamped, lengths, _width(ids)), atol=1e-5, rtol=1e-4)


def test_long_empty_and_contradictory_rows(encoder):
    ts, ids, lengths, positions, _vocab = encoder
    with torch.no_grad():
        good = ts(*ragged_rows_of(ids, (torch.arange(ids.shape[1]) < lengths).long()))  # (2, D)
        long_ids = torch.cat([ids, torch.full((2, 5000), 5)], dim=1)
        long_out = ts(long_ids, torch.full((2, 1), long_ids.shape[1]), _width(long_ids))  # capped to the table
        cut = long_ids[:, :positions]
        torch.testing.assert_close(long_out, ts(cut, torch.full((2, 1), positions), _width(cut)))
        for flat, n in ((torch.zeros(0, dtype=torch.int64), 3), (torch.zeros(5, dtype=torch.int64), 0)):
            rows = torch.full((n, 1), 2)
            assert ts(flat, rows, rows).shape[0] == n  # no ids / no rows
        wide = ts(ids, lengths, torch.full((2, 1), 10**15))  # widths past the ids: row 2 starts past the end
        over = ts(ids, lengths + 10**6, _width(ids))  # lengths over the widths: the whole row counts
        negative = ts(ids, -lengths, -_width(ids))
        few = ts(ids.reshape(-1), torch.cat([lengths, lengths]), _width(ids))  # 4 rows, 2 widths given
    torch.testing.assert_close(wide[0], good[0], atol=1e-5, rtol=1e-4)
    assert wide.shape == over.shape == negative.shape == (2, good.shape[1]) and few.shape == (4, good.shape[1])
    for out in (long_out, wide, over, negative, few):
        assert torch.isfinite(out).all()
