"""The checked-in example repository (docs/model_repository_example/) is exactly what `clip-triton build` writes
(two tiny models in one repository: tests/snapshot.py)."""

from __future__ import annotations

from tests import snapshot


def test_checked_in_repository_matches_a_fresh_build(tmp_path):
    """Every config.pbtxt, info.json and clip_triton.json of a fresh build equals the checked-in snapshot."""
    diffs = snapshot.differences(snapshot.render(tmp_path), snapshot.stored())
    assert not diffs, (
        f"{len(diffs)} generated file(s) differ from {snapshot.SNAPSHOT.relative_to(snapshot.ROOT)} "
        f"(review the diff, then regenerate with: {snapshot.UPDATE_COMMAND}):\n" + "".join(diffs)
    )
