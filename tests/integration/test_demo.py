"""`clip-triton demo` (the README's main job) end to end, offline: labelled random stand-in -> Triton -> zero-shot."""

from __future__ import annotations

import re
import subprocess
import sys

from PIL import Image

from clip_server.demo import RANDOM_LABEL, SAMPLES


def test_demo_offline_runs_end_to_end(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "clip_client.cli", "demo", "--offline", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert RANDOM_LABEL in out  # never passed off as the real checkpoint
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4] tritonserver ready"):
        assert step in out
    rows = [line for line in out.splitlines() if any(line.strip().startswith(name) for _, name, _, _ in SAMPLES)]
    assert len(rows) == len(SAMPLES)
    labels = [label for _, _, label, _ in SAMPLES]
    for row in rows:  # "<image>  <predicted label>  <score>  <expected>": a real label and a probability in (0, 1)
        assert any(label in row for label in labels)
        p = float(re.search(r"\s([01]\.\d{3})\s", row).group(1))
        assert 0.0 < p <= 1.0
    assert "Best image for each text:" in out
    assert (tmp_path / "repository" / "clip_triton.json").is_file()
    # real photographs (from the scikit-image wheel), credited with their licences
    for _, name, _, licence in SAMPLES:
        with Image.open(tmp_path / "images" / name) as img:
            assert img.size[0] >= 300 and img.size[1] >= 300 and len(img.getcolors(1 << 24) or ()) > 1000
        assert licence in out
    # nothing from third parties on screen: no warnings, no progress bars (our own log lines only)
    screen = proc.stdout + proc.stderr
    assert "Writing model shards" not in screen and "it/s]" not in screen
    assert "[transformers]" not in screen and "Warning" not in screen and "torchvision" not in screen
    assert all(line.split(" ")[0] in ("INFO", "WARNING") and " clip_" in line for line in proc.stderr.splitlines()), (
        proc.stderr[-3000:]
    )
