"""The checked-in example repository (docs/model_repository_example/): what `clip-triton build` writes for two tiny
random checkpoints in one repository (a CLIP, unprefixed, and a Chinese-CLIP served as `tiny-cn__*`), minus the
weights, so a change to the generated configs shows in review.

    python -m tests.snapshot --update     # regenerate docs/model_repository_example/ (also: make snapshot)
    python -m tests.snapshot              # compare; exit 1 and name the differing files

tests/integration/test_repository_snapshot.py runs the comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT = ROOT / "docs" / "model_repository_example"
UPDATE_COMMAND = "python -m tests.snapshot --update  (or: make snapshot)"
# (family, folder base name, model name): folder names are fixed because a model's name and source derive from them
MODELS = (("clip", "tiny-clip", "tiny-clip"), ("chinese_clip", "tiny-chinese-clip", "tiny-cn"))
# The build's options: everything that depends on the machine it runs on is given, so the output does not.
BUILD_ARGS = ["--cores", "2", "--max-batch-size", "64"]
# clip_triton.json fields that vary with the machine, the time or the torch build: replaced by a placeholder.
VOLATILE = ("built_at", "torch_version", "weights_dir", "source")
KEPT_FILES = ("config.pbtxt", "info.json", "clip_triton.json")  # everything else (weights, tokenizer, model.py) is not
README = "README.md"  # the snapshot's own, hand-written


def _normalise(path: Path) -> str:
    """A generated file's text, with clip_triton.json's volatile fields (time, torch, absolute paths) replaced."""
    text = path.read_text(encoding="utf-8")
    if path.name != "clip_triton.json":
        return text
    return json.dumps(_placeholders(json.loads(text)), indent=2) + "\n"


def _placeholders(value, key: str = ""):
    """`value` with every VOLATILE field (at any depth) and the TorchScript files' sha256s replaced by `<name>`."""
    if key in VOLATILE or (key == "sha256" and isinstance(value, str)):
        return f"<{key}>"
    if isinstance(value, dict):
        return {k: _placeholders(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_placeholders(v) for v in value]
    return value


def render(workdir: Path) -> dict[str, str]:
    """Relative path -> text of every kept file of a fresh build of the tiny checkpoint, through the CLI."""
    from clip_build.synthetic import make_random_checkpoint
    from clip_client.cli import main

    repo, commands, build = workdir / "repository", [], ["build", "--repository", str(workdir / "repository")]
    for family, folder, name in MODELS:
        checkpoint = make_random_checkpoint(workdir / "checkpoint" / folder, family, "tiny", seed=0)
        commands.append(["convert", "--checkpoint", str(checkpoint), "--out", str(workdir / "weights" / folder)])
        build += ["--weights", f"{name}={workdir / 'weights' / folder}"]
    with contextlib.redirect_stdout(io.StringIO()):  # the commands print what they wrote
        for argv in [*commands, build + BUILD_ARGS]:
            if main(argv) != 0:
                raise RuntimeError(f"clip-triton {' '.join(argv)} failed")
    files = sorted(p for p in repo.rglob("*") if p.is_file() and p.name in KEPT_FILES)
    return {p.relative_to(repo).as_posix(): _normalise(p) for p in files}


def stored() -> dict[str, str]:
    """Relative path -> text of the checked-in snapshot (its README excluded)."""
    return {
        p.relative_to(SNAPSHOT).as_posix(): p.read_text(encoding="utf-8")
        for p in sorted(SNAPSHOT.rglob("*"))
        if p.is_file() and p.name != README
    }


def differences(new: dict[str, str], old: dict[str, str]) -> list[str]:
    """A unified diff per file that differs, is missing or is extra (empty: identical)."""
    out = []
    for rel in sorted(set(new) | set(old)):
        if new.get(rel) != old.get(rel):
            diff = difflib.unified_diff(
                (old.get(rel) or "").splitlines(keepends=True),
                (new.get(rel) or "").splitlines(keepends=True),
                f"checked-in/{rel}",
                f"rendered/{rel}",
            )
            out.append("".join(diff) or f"{rel}: differs\n")
    return out


def update(new: dict[str, str]) -> None:
    """Write the rendered files over the snapshot, removing files the build no longer writes."""
    for rel in stored():
        if rel not in new:
            (SNAPSHOT / rel).unlink()
    for rel, text in new.items():
        (SNAPSHOT / rel).parent.mkdir(parents=True, exist_ok=True)
        (SNAPSHOT / rel).write_text(text, encoding="utf-8")
    for folder in sorted(SNAPSHOT.rglob("*"), reverse=True):  # folders left empty
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", action="store_true", help="rewrite the snapshot instead of comparing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="clip-snapshot-") as tmp:
        new = render(Path(tmp))
    if args.update:
        update(new)
        print(f"wrote {len(new)} files under {SNAPSHOT.relative_to(ROOT)}")
        return 0
    diffs = differences(new, stored())
    sys.stdout.write("".join(diffs))
    if diffs:
        print(f"{len(diffs)} file(s) differ from {SNAPSHOT.relative_to(ROOT)}; regenerate with: {UPDATE_COMMAND}")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
