"""`clip-triton demo`: the main job in one command: checkpoint -> Parquet -> TorchScript repository -> Triton -> zero-shot."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = "openai/clip-vit-base-patch32"
RANDOM_LABEL = "RANDOM WEIGHTS (offline stand-in for openai/clip-vit-base-patch32: same shapes, real tokenizer)"
# (file name, label it depicts, drawing) for the sample images; the labels double as the zero-shot classes.
SAMPLES = [
    ("red_circle.jpg", "a red circle"),
    ("blue_square.png", "a blue square"),
    ("green_stripes.webp", "green stripes"),
    ("yellow_triangle.jpg", "a yellow triangle"),
]


COMMAND_HELP = {"demo": "convert, build, serve and show a zero-shot result (the main job)"}


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Options of `clip-triton demo`."""
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                        help="hub id or local HF folder (offline: a random-weight checkpoint of the same shape)")
    parser.add_argument("--offline", action="store_true", help="do not try the hub; use the random-weight stand-in")
    parser.add_argument("--workdir", default=".artifacts/demo", help="where checkpoints, weights and the repository go")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="encoder dtype")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--keep-serving", action="store_true", help="keep the server up after the demo until Ctrl-C")


def sample_images(folder: Path) -> list[Path]:
    """Draw the sample images (simple shapes whose labels a real CLIP gets right)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, _label in SAMPLES:
        img = Image.new("RGB", (320, 240), "white")
        draw = ImageDraw.Draw(img)
        if "circle" in name:
            draw.ellipse((80, 40, 240, 200), fill=(220, 20, 30))
        elif "square" in name:
            draw.rectangle((90, 50, 230, 190), fill=(20, 40, 220))
        elif "stripes" in name:
            for x in range(0, 320, 40):
                draw.rectangle((x, 0, x + 19, 240), fill=(20, 170, 40))
        else:
            draw.polygon([(160, 30), (270, 210), (50, 210)], fill=(240, 210, 20))
        path = folder / name
        img.save(path)
        paths.append(path)
    return paths


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
    from clip_client import CLIPClient

    from clip_build.convert import convert
    from clip_build.repository import build_repository

    from .process import TritonServer

    workdir = Path(args.workdir)
    started = time.monotonic()
    checkpoint, is_random = resolve_checkpoint(args.checkpoint, workdir, args.offline)
    label = RANDOM_LABEL if is_random else args.checkpoint
    print(f"[1/4] checkpoint: {label}", flush=True)
    weights = workdir / "weights"
    manifest = convert(str(checkpoint), weights)
    print(f"[2/4] Parquet weights: {weights} (model_id {manifest['model_id']})", flush=True)
    repo = build_repository(weights, workdir / "repository", dtype=args.dtype)
    print(f"[3/4] Triton repository with TorchScript encoders: {repo}", flush=True)
    images = sample_images(workdir / "images")
    labels = [label_ for _name, label_ in SAMPLES]
    with TritonServer(repo) as server:
        print(f"[4/4] tritonserver ready: HTTP {server.http_url}  gRPC {server.grpc_url}", flush=True)
        url = server.grpc_url if args.protocol == "grpc" else server.http_url
        with CLIPClient(url, protocol=args.protocol) as client:
            predictions, probabilities = client.zero_shot_classification(
                [str(p) for p in images], labels, templates=["a photo of {}.", "{}"])
            best = client.find_best_matches(labels, [str(p) for p in images], top_k=1)
        print(f"\nZero-shot over {len(labels)} labels ({label}):")
        print(f"  {'image':<22} {'prediction':<20} {'p':>6}   expected")
        for path, pred, probs, expected in zip(images, predictions, probabilities, labels):
            print(f"  {path.name:<22} {labels[int(pred)]:<20} {probs[int(pred)]:6.3f}   {expected}")
        print("\nBest image for each text:")
        for text, idx in zip(labels, best):
            print(f"  {text!r:<22} -> {images[int(idx[0])].name}")
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
    sys.exit(run(argparse.Namespace(checkpoint=DEFAULT_CHECKPOINT, offline=True, workdir=".artifacts/demo",
                                    dtype="fp32", protocol="grpc", keep_serving=False), "demo"))
