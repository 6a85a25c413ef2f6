"""The client installs alone (`pip install ./client`: no torch, transformers or Triton server) and the README's
client examples run from that install, as written, against the real server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("torch", "transformers", "pytriton", "tritonserver", "clip_build", "clip_server", "clip_runtime")


def readme_python_blocks() -> list[str]:
    """The README's ```python blocks."""
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S)


def needs_extra(block: str) -> bool:
    """Whether a README example uses a client extra (galleries, adapters): those run in the full install
    (tests/integration/test_gallery.py)."""
    return "clip_client.gallery" in block or "clip_client.integrations" in block


def uses_other_sdk(block: str) -> bool:
    """Whether a README example is the OpenAI-compatible API's (openai SDK, LangChain): tests/integration/
    test_openai.py runs those against the front end."""
    return "from openai import" in block or "langchain_openai" in block


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """A fresh Python 3.11 venv with only `pip install ./client` in it."""
    venv = tmp_path_factory.mktemp("client-venv") / "venv"
    assert _run([sys.executable, "-m", "venv", str(venv)]).returncode == 0
    done = _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(ROOT / "client")])
    assert done.returncode == 0, done.stderr[-3000:]
    return venv


def _client_version() -> str:
    """The version in client/pyproject.toml."""
    import tomllib

    return tomllib.loads((ROOT / "client" / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]


def _env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_client_install_has_no_server_side_packages(client_venv):
    probe = (
        "import importlib.util, json; print(json.dumps({m: importlib.util.find_spec(m) is not None "
        f"for m in {FORBIDDEN + ('clip_client', 'clip_common', 'tritonclient')!r}}}))"
    )
    done = _run([str(client_venv / "bin" / "python"), "-c", probe], env=_env(client_venv), cwd=client_venv)
    found = __import__("json").loads(done.stdout)
    assert found.pop("clip_client") and found.pop("clip_common") and found.pop("tritonclient")
    assert not any(found.values()), found
    dists = _run([str(client_venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"]).stdout.lower()
    for name in ("torch", "transformers", "nvidia-pytriton", "clip-triton=="):
        assert f"\n{name}" not in "\n" + dists, name


def test_readme_client_examples_run_from_the_client_install(client_venv, triton_server, tmp_path):
    """Every ```python block of the README (tritonclient, the sync and the async client), as written, from the client
    install, in a folder holding what `make demo` leaves for them (its photos)."""
    from clip_server.demo import sample_images

    blocks = [b for b in readme_python_blocks() if not needs_extra(b) and not uses_other_sdk(b)]
    assert sum("from clip_client import" in b for b in blocks) >= 2, "the README shows the sync and the async client"
    assert any("import tritonclient" in b for b in blocks)
    sample_images(tmp_path / ".artifacts" / "demo" / "images")
    for i, block in enumerate(blocks):
        code = block.replace("127.0.0.1:8001", triton_server.grpc_url).replace("127.0.0.1:8000", triton_server.http_url)
        script = tmp_path / f"example_{i}.py"
        script.write_text(code, encoding="utf-8")
        done = _run([str(client_venv / "bin" / "python"), str(script)], cwd=tmp_path, env=_env(client_venv))
        assert done.returncode == 0, f"README example {i} failed:\n{code}\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr and "Warning" not in done.stderr, done.stderr[-3000:]


def test_client_commands_from_the_client_install(client_venv, triton_server, tmp_path):
    cli = str(client_venv / "bin" / "clip-triton")
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    done = _run([cli, "--help"], env=_env(client_venv))
    assert done.returncode == 0 and "classify" in done.stdout and "convert" not in done.stdout
    done = _run([cli, "--version"], env=_env(client_venv))
    assert done.returncode == 0 and done.stdout.strip() == "clip-triton-client " + _client_version()
    done = _run(
        [
            cli,
            "classify",
            str(tmp_path / "red.png"),
            "--labels",
            "red",
            "blue",
            "--url",
            triton_server.grpc_url,
            "--json",
        ],
        env=_env(client_venv),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"label"' in done.stdout
    # a command that needs a missing extra: exit 2, a clear message naming the extra, no traceback
    for uri, extra in ((tmp_path / "g", "gallery"), (tmp_path / "g.db", "milvus")):
        done = _run(
            [cli, "index", str(tmp_path), "--uri", str(uri), "--url", triton_server.grpc_url], env=_env(client_venv)
        )
        assert done.returncode == 2 and f"clip-triton-client[{extra}]" in done.stderr and "Traceback" not in done.stderr
        assert "ModuleNotFoundError: No module named" in done.stderr  # the real import error is shown too
    done = _run(
        [cli, "search", "a cat", "--uri", str(tmp_path / "g"), "--url", triton_server.grpc_url], env=_env(client_venv)
    )
    assert done.returncode == 2 and "clip-triton-client[gallery]" in done.stderr and "Traceback" not in done.stderr
    # the protocols come with the plain install; the adapters name their extras
    probe = "from clip_client import MultimodalEmbeddingProvider; import clip_client.integrations.langchain"
    done = _run([str(client_venv / "bin" / "python"), "-c", probe], env=_env(client_venv), cwd=tmp_path)
    assert done.returncode != 0 and "clip-triton-client[langchain]" in done.stderr


def test_gallery_extra_resolves_a_working_set_in_a_fresh_venv(triton_server, tmp_path):
    """`pip install "./client[gallery]"` in a fresh venv: the numpy, pyarrow and faiss it resolves import together,
    and index + search work from that install against the real server."""
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", str(venv)]).returncode == 0
    done = _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(ROOT / "client") + "[gallery]"])
    assert done.returncode == 0, done.stderr[-3000:]
    probe = "import numpy, pyarrow, faiss; print(numpy.__version__, pyarrow.__version__)"
    done = _run([str(venv / "bin" / "python"), "-c", probe], env=_env(venv), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.new("RGB", (64, 48), colour).save(photos / f"p{i}.png")
    cli = str(venv / "bin" / "clip-triton")
    done = _run(
        [cli, "index", str(photos), "--uri", str(tmp_path / "g"), "--url", triton_server.grpc_url, "--no-progress"],
        env=_env(venv),
    )
    assert done.returncode == 0 and "3 added" in done.stdout, done.stderr[-3000:]
    done = _run(
        [cli, "search", "a red square", "--uri", str(tmp_path / "g"), "-k", "2", "--url", triton_server.grpc_url],
        env=_env(venv),
    )
    assert done.returncode == 0 and len(done.stdout.strip().splitlines()) == 2, done.stderr[-3000:]
