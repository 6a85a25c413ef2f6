"""Test levels (a marker per folder) and the session fixtures parity and integration tests share: random HF
checkpoints made with transformers and converted WEIGHTS_DIRs (cached).

    pytest -m unit          # tests/unit: pure functions, Python models with Triton faked (seconds)
    pytest -m parity        # tests/parity: golden results against transformers (and nothing else)
    pytest -m integration   # tests/integration: the real Triton server, and the build pipeline on random checkpoints
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.parity.parity_results import PARITY

LEVELS = ("unit", "parity", "integration")


def pytest_collection_modifyitems(config, items):
    """Mark every test with its level, from the folder it lives in, unless it names its level itself (a served
    parity module's checks that are not parity share its server: @pytest.mark.integration)."""
    for item in items:
        if any(item.get_closest_marker(level) for level in LEVELS):
            continue
        parts = Path(str(item.fspath)).parts
        for level in LEVELS:
            if level in parts:
                item.add_marker(getattr(pytest.mark, level))
                break


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Callable[..., Path]:
    """Factory (family, size="tiny") -> HF checkpoint folder; family: clip | chinese_clip | bert."""
    from clip_build.synthetic import make_random_checkpoint

    cache: dict[tuple[str, str], Path] = {}

    def get(family: str, size: str = "tiny") -> Path:
        if (family, size) not in cache:
            out = tmp_path_factory.mktemp(f"ckpt-{family}-{size}")
            cache[family, size] = make_random_checkpoint(out, family, size)
        return cache[family, size]

    return get


@pytest.fixture(scope="session")
def weights(tmp_path_factory, checkpoints) -> Callable[..., Path]:
    """Factory (family, size="tiny") -> converted WEIGHTS_DIR; family: clip | chinese_clip | bert_vit."""
    from clip_build.convert import convert

    cache: dict[tuple[str, str], Path] = {}

    def get(family: str, size: str = "tiny") -> Path:
        if (family, size) not in cache:
            out = tmp_path_factory.mktemp(f"weights-{family}-{size}")
            if family == "bert_vit":  # a BERT text tower + the CLIP checkpoint's ViT; projection freshly initialised
                convert(str(checkpoints("bert", size)), out, vision_checkpoint=str(checkpoints("clip", size)))
            else:
                convert(str(checkpoints(family, size)), out)
            cache[family, size] = out
        return cache[family, size]

    return get


def pytest_terminal_summary(terminalreporter):
    """Print the parity table (min cosine per family per tower) when parity tests ran."""
    if not PARITY:
        return
    terminalreporter.write_sep("-", "parity vs transformers: min cosine over all inputs")
    for (family, tower), cos in sorted(PARITY.items()):
        terminalreporter.write_line(f"{family:<24} {tower:<20} {cos:.9f}  (1 - cos = {max(0.0, 1 - cos):.1e})")


for _name in ("clip_build", "clip_server", "clip_loadtest"):
    logging.getLogger(_name).setLevel(logging.INFO)
