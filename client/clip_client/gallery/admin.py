"""The `clip-triton gallery-info | gallery-check` commands: how a gallery searches (index, operating point, measured
recall; --tune re-measures it) and whether its files are intact (--repair rebuilds what derives from the segments)."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import CLIPClientError, InvalidInputError
from .base import Gallery, is_milvus_uri

COMMAND_HELP = {
    "gallery-info": "show a gallery's size, index and operating point (measured recall)",
    "gallery-check": "verify a gallery's files (checksums, sizes, manifest); --repair rebuilds the index",
}


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Arguments of `clip-triton gallery-info | gallery-check`."""
    parser.add_argument("--uri", "--gallery", dest="uri", default="gallery", help="the gallery (a folder, or Milvus)")
    if command == "gallery-info":
        parser.add_argument(
            "--tune",
            action="store_true",
            help="first re-measure recall against exact search and store the cheapest operating point "
            "(PQ: candidates re-ranked; IVF: nprobe) reaching "
            "--target-recall (on OOD-like probes drawn from the gallery)",
        )
        parser.add_argument("--target-recall", type=float, default=0.95, help="recall@10 --tune aims for")
        parser.add_argument("--json", action="store_true", help="print JSON")
    else:
        parser.add_argument(
            "--repair", action="store_true", help="rebuild the index and the manifest's counters from the segments"
        )


def run(args: argparse.Namespace, command: str) -> int:
    """gallery-info: 0, 2 on errors. gallery-check: 0 intact (or repaired), 1 problems left, 2 on errors."""
    try:
        return _info(args) if command == "gallery-info" else _check(args)
    except CLIPClientError as e:
        print(f"clip-triton {command}: error: {e}", file=sys.stderr)
        return 2


def _info(args: argparse.Namespace) -> int:
    with Gallery.open(args.uri) as gallery:
        if args.tune:
            gallery.tune(target_recall=args.target_recall)
        info = gallery.info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>18}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0


def _check(args: argparse.Namespace) -> int:
    if is_milvus_uri(args.uri):
        raise InvalidInputError("gallery-check verifies embedded galleries (Milvus checks its own storage)")
    from .local import check_gallery

    problems, repairs = check_gallery(args.uri, repair=args.repair)
    for p in problems:
        print(f"problem: {p}")
    for r in repairs:
        print(f"repaired: {r}")
    if not problems:
        print(f"{args.uri}: intact")
        return 0
    if args.repair:
        left = check_gallery(args.uri)[0]
        for p in left:
            print(f"still damaged: {p}")
        return 1 if left else 0
    print("run with --repair to rebuild the derived files from the segments", file=sys.stderr)
    return 1
