"""The GPU kit, assembled for this Python and run through its own launcher in CPU mode (tiny model), so it cannot
rot: the kit's tritonserver, stub, perf_analyzer, tritonclient, numpy and our packages serve and measure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clip_loadtest.gpukit.assemble import DEFAULT_MAX_MIB, assemble, loaded_libraries
from clip_server.binary import PYTHON_TAG, libs_dir, triton_root


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("gpu-kit")
    return out, assemble(out, PYTHON_TAG, level=0)


@pytest.fixture(scope="module")
def kit_run(kit, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    folder, _ = kit
    tmp = tmp_path_factory.mktemp("gpu-kit-run")
    env = dict(os.environ, CLIP_GPUKIT_HOME=str(tmp / "home"))
    for name in ("CLIP_TRITON_SERVER_ROOT", "CLIP_TRITON_PYTHON_ENV", "CLIP_TRITON_TEMPLATE"):
        env.pop(name, None)
    done = subprocess.run(
        [
            sys.executable,
            str(folder / "run_kit.py"),
            "--device",
            "cpu",
            "--out",
            str(tmp / "out"),
            "--workdir",
            str(tmp / "work"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=540,
    )
    return done, tmp / "out"


def test_kit_holds_what_the_server_loads_and_fits(kit, kit_run):
    _, meta = kit
    assert meta["kit_bytes"] <= DEFAULT_MAX_MIB * 2**20 and meta["python"] == PYTHON_TAG
    (unpacked,) = (kit_run[1].parent / "home").iterdir()  # the launcher's unpack of kit.tar.xz
    names = {str(p.relative_to(unpacked)) for p in unpacked.rglob("*") if not p.is_dir()}
    stubs = {n for n in names if n.startswith("server/") and n.endswith("triton_python_backend_stub")}
    assert stubs == {f"server/pytriton/tritonserver/python_backend_stubs/{PYTHON_TAG}/triton_python_backend_stub"}
    root = triton_root()
    libs = {
        f"server/nvidia_pytriton.libs/{p.name}"
        for p in loaded_libraries(
            [root / "bin" / "tritonserver", root / "backends" / "python" / "libtriton_python.so"], libs_dir()
        )
    }
    assert libs and libs <= names
    assert not any("libpython3" in n for n in names), "the wheel's libpython3.13 is for the 3.13 stub only"
    assert "tools/bin/perf_analyzer" in names and "site/tritonclient/grpc/__init__.py" in names
    assert not any(n.startswith("site/tritonclient/http") for n in names), "the HTTP client needs gevent"
    assert "stub-site/numpy/__init__.py" in names and not any("/tests/" in n for n in names)
    assert {
        "src/clip_runtime/image.py",
        "src/clip_loadtest/gpukit/run.py",
        "cache/clip_bpe/vocab.json",
        "model_repository/preprocess_image/1/model.py",
    } <= names


def test_kit_serves_and_measures_on_cpu(kit_run):
    done, out = kit_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "gpukit.json").read_text())
    env = results["environment"]
    root = env["kit_root"]
    assert root and env["tritonserver"].startswith(root)
    assert all(origin.startswith(root) for origin in env["packages"].values()), env["packages"]
    stub = env["stub_python"]
    assert stub["numpy_at"].startswith(root) and stub["clip_runtime_at"].startswith(root)
    assert int(stub["numpy"].split(".")[0]) < 2
    assert list(results["dtypes"]) == ["bf16"] and not results["errors"]  # bf16 unless --dtypes says more
    assert results["gpu_decode"] == {"skipped": ["--device cpu: no GPU"]}
    for dtype, res in results["dtypes"].items():
        assert not res["errors"] and not res["skipped"], (dtype, res)
        assert res["preprocess"]["image_decode"] == "cpu" and res["preprocess"]["rule"] == "auto"
        assert min(res["parity"].values()) >= 0.999
        assert res["towers"]["image_per_s"] > 0 and set(res["towers"]["text_per_s"]) == {"16", "77"}
        for kind in ("image", "text"):
            e2e = res["e2e"][kind]
            assert e2e["requests"] > 0 and e2e["errors"] == 0 and e2e["p99_ms"] >= e2e["p50_ms"] > 0
            assert e2e["models"][f"{kind}_encoder"]["requests"] > 0
            assert res["latency"][kind]["items_per_request"] == 8
            assert res["perf_analyzer"][kind]["items_per_s"] > 0, res["perf_analyzer"][kind]
        assert (out / f"tritonserver-{dtype}.log").is_file()
    checks = {c["name"]: c["verdict"] for c in results["checks"]}
    # the served parity (image, text) and the FP8 tower's gate (emulated on the CPU) pass; CUDA graphs need CUDA
    assert [v for n, v in checks.items() if "cosine" in n] == ["PASS"] * 3
    assert results["dtypes"]["bf16"]["fast"]["graphs"] == {"skipped": "CUDA graphs need a CUDA device"}
    assert all(v == "n/a" for n, v in checks.items() if "cosine" not in n)  # the GPU targets
    report = (out / "gpukit.md").read_text()
    assert "## Checks" in report and "| end to end | image |" in report and "perf_analyzer" in report
