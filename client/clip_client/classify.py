"""`clip-triton classify`: zero-shot classification of image files against labels, per file [{label, score}]."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from ._core import DEFAULT_TEMPLATE
from .cli import EXIT_ERROR, EXIT_OK, EXIT_SOME_FAILED, add_connection_arguments, connect
from .errors import CLIPClientError, InvalidInputError

COMMAND_HELP = {"classify": "zero-shot classify images against labels"}


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Arguments of `clip-triton classify`."""
    parser.add_argument("images", nargs="*", help="image files or http(s) URLs (or --uri)")
    parser.add_argument(
        "--uri",
        default=None,
        help="instead of files: a gallery's images, from their stored embeddings (no image is sent)",
    )
    parser.add_argument("--filter", default=None, help="with --uri: only the gallery rows matching this filter")
    parser.add_argument("--labels", nargs="+", required=True, help="class names")
    parser.add_argument(
        "--template",
        action="append",
        dest="templates",
        default=None,
        help=f"prompt with {{}} for the label (repeatable: averaged; '{{}}' = the bare label) "
        f"(default: {DEFAULT_TEMPLATE!r})",
    )
    parser.add_argument("-k", "--top-k", type=int, default=None, help="labels to show per image (default: all)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_connection_arguments(parser)


def run(args: argparse.Namespace, command: str) -> int:
    """Classify; the exit status follows cli.EXIT_STATUS (1 when some images failed: listed, the rest classified)."""
    try:
        if (args.uri is None) == (not args.images):
            raise InvalidInputError("give image files or --uri GALLERY (exactly one)")
        with connect(args) as client:
            if args.uri is not None:
                from .gallery.cli import classify_gallery

                rows = classify_gallery(client, args.uri, args.labels, args.templates, args.top_k, args.filter)
                failed = []
            else:
                rows, failed = classify_files(client, args.images, args.labels, args.templates, args.top_k)
    except CLIPClientError as e:
        print(f"clip-triton {command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps({"results": rows, "failed": [{"path": p, "error": m} for p, m in failed]}, indent=2))
    else:
        for row in rows:
            print(row["path"] + "\t" + "\t".join(f"{x['label']} {x['score']:.4f}" for x in row["labels"]))
        for path, msg in failed:
            print(f"skipped {path}: {msg}", file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def classify_files(
    client: Any, images: list[str], labels: list[str], templates: list[str] | None, top_k: int | None
) -> tuple[list[dict], list[tuple[str, str]]]:
    """([{"path", "labels": [{label, score}] best first}], [(path, why it failed)]): a bad file fails alone."""
    from .gallery import encode_tolerant
    from .inputs import image_item_bytes

    items: list[bytes] = []
    where: list[int] = []  # index into images of each item
    failed: dict[int, str] = {}
    for n, p in enumerate(images):
        try:
            items.append(image_item_bytes(p, p, client.max_download_bytes, client.timeout))
            where.append(n)
        except CLIPClientError as e:
            failed[n] = str(e).removeprefix(f"{p}: ")
    good: dict[int, np.ndarray] = {}
    limit = client.get_model_info().max_image_items
    for lo in range(0, len(items), limit):
        g, bad = encode_tolerant(client, items[lo : lo + limit])
        good.update({where[lo + i]: e for i, e in g.items()})
        failed.update({where[lo + i]: m for i, m in bad.items()})
    order = sorted(good)
    rows = []
    if order:
        ranked = client.classify(np.stack([good[n] for n in order]), labels, templates, top_k)  # embeddings in
        rows = [{"path": images[n], "labels": r} for n, r in zip(order, ranked)]
    return rows, [(images[n], failed[n]) for n in sorted(failed)]
