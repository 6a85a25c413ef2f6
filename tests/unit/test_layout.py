"""Packages by lifecycle: who may import whom (no cycles), and what the client and the Triton runtime never import."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "clip_common": ROOT / "client" / "clip_common",
    "clip_client": ROOT / "client" / "clip_client",
    "clip_runtime": ROOT / "build" / "clip_runtime",
    "clip_build": ROOT / "build" / "clip_build",
    "clip_server": ROOT / "build" / "clip_server",
    "clip_loadtest": ROOT / "loadtest" / "clip_loadtest",
}
# package -> the project packages it may import (a layered order: nothing imports upwards)
ALLOWED = {
    "clip_common": set(),
    "clip_client": {"clip_common"},
    "clip_runtime": {"clip_common"},
    "clip_build": {"clip_common", "clip_runtime"},
    "clip_server": {"clip_common", "clip_runtime", "clip_build", "clip_client"},
    "clip_loadtest": {"clip_common", "clip_runtime", "clip_build", "clip_server", "clip_client"},
}
HEAVY = {"torch", "transformers", "pytriton", "safetensors", "huggingface_hub"}
# The --image-decode gpu path: preprocess_image's model imports it only when its config says image_decode=gpu.
GPU_ONLY = {PACKAGES["clip_runtime"] / "gpu_image.py"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def _package_imports(name: str, skip: set[Path] = frozenset()) -> set[str]:
    return set().union(*(_imports(p) for p in PACKAGES[name].rglob("*.py") if p not in skip))


def test_packages_import_only_downwards():
    for name in PACKAGES:
        used = _package_imports(name) & (set(PACKAGES) - {name})
        assert used <= ALLOWED[name], f"{name} imports {sorted(used - ALLOWED[name])}"


def test_client_and_runtime_stay_light():
    assert not _package_imports("clip_client") & (HEAVY | {"clip_build", "clip_server", "clip_runtime"})
    assert not _package_imports("clip_common") - set(sys.stdlib_module_names) - {"numpy"}  # stdlib and numpy only
    runtime = _package_imports("clip_runtime", skip=GPU_ONLY)
    assert not runtime & HEAVY, "the Python models' runtime must not import torch (stub memory)"
    assert not set().union(*map(_imports, GPU_ONLY)) & HEAVY - {"torch"}
    for model in (ROOT / "model_repository").glob("*/1/model.py"):
        assert not _imports(model) & HEAVY, model


def test_no_sys_path_edits():
    for folder in PACKAGES.values():
        for path in folder.rglob("*.py"):
            assert "sys.path.insert" not in path.read_text() and "sys.path.append" not in path.read_text(), path
