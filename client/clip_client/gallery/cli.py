"""The `clip-triton index | search | classify` commands (on the Gallery API of this package)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .. import ops
from ..errors import CLIPClientError, InvalidInputError
from .base import Gallery
from .indexing import encode_tolerant, index_folder

DEFAULT_URI = "gallery"

COMMAND_HELP = {"index": "index a folder of images into a gallery", "search": "search a gallery by text or image",
                "classify": "zero-shot classify images against labels"}


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Arguments of `clip-triton index | search | classify`."""
    uri_help = ("gallery: a folder (embedded index, created on first use), a Milvus server http://host:19530 or a "
                "milvus-lite file *.db; '?collection=NAME' picks the Milvus collection")
    if command == "index":
        parser.add_argument("image_dir", help="folder of images (searched recursively) or one image file")
        parser.add_argument("--uri", "--out", dest="uri", default=DEFAULT_URI, help=uri_help + f" (default {DEFAULT_URI})")
        parser.add_argument("--batch-size", type=int, default=None, help="images per request (default: the server's limit)")
        parser.add_argument("--tag", action="append", dest="tags", default=None, help="tag every indexed image (repeatable)")
        parser.add_argument("--retry-failed", action="store_true", help="send again the files that failed before")
        parser.add_argument("--optimize", action="store_true",
                            help="afterwards merge small segments and retrain the embedded index for its size")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    elif command == "search":
        parser.add_argument("query", nargs="?", help="text query")
        parser.add_argument("--image", help="image query (a file) instead of a text")
        parser.add_argument("--like", metavar="PATH", help="images similar to an indexed image (its stored embedding)")
        parser.add_argument("--uri", "--gallery", dest="uri", default=DEFAULT_URI, help=uri_help + f" (default {DEFAULT_URI})")
        parser.add_argument("--filter", help='e.g. \'size > 100000 and array_contains(tags, "cat")\' (README: filters)')
        parser.add_argument("-k", "--top-k", type=int, default=10, help="results to show (default 10)")
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    elif command == "classify":
        parser.add_argument("images", nargs="*", help="image files (or --uri: the images of a gallery)")
        parser.add_argument("--uri", default=None, help="classify a gallery's images by their stored embeddings")
        parser.add_argument("--filter", help="with --uri: only the rows matching this filter")
        parser.add_argument("--labels", nargs="+", required=True, help="class names")
        parser.add_argument("--template", action="append", dest="templates", default=None,
                            help="prompt template with {} for the label, e.g. 'a photo of a {}.' (repeatable; averaged)")
        parser.add_argument("-k", "--top-k", type=int, default=1, help="labels to show per image (default 1)")
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--url", default=None, help="server address host:port (default 127.0.0.1:8001 grpc, :8000 http)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="default grpc")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")


def run(args: argparse.Namespace, command: str) -> int:
    """Run one command; 0 on success (also when some files were skipped: they are listed), 2 on errors."""
    from ..client import CLIPClient

    try:
        if command == "search" and args.like is not None:
            return _run_like(args)
        if command == "classify" and (args.uri is None) == (not args.images):
            raise InvalidInputError("give image files or --uri GALLERY (exactly one)")
        with CLIPClient(args.url, protocol=args.protocol, timeout=args.timeout) as client:
            if command == "classify" and args.uri is not None:
                return _run_classify_gallery(client, args)
            return {"index": _run_index, "search": _run_search, "classify": _run_classify}[command](client, args)
    except CLIPClientError as e:
        print(f"clip-triton {command}: error: {e}", file=sys.stderr)
        return 2


def _run_index(client: Any, args: argparse.Namespace) -> int:
    if not Path(args.image_dir).exists():
        raise InvalidInputError(f"{args.image_dir} does not exist")
    info = client.get_model_info()
    with Gallery.create(args.uri, info.dim, info.model_id, exist_ok=True, logit_scale=info.logit_scale,
                        identity_source=info.identity_source) as gallery:
        report = index_folder(client, gallery, args.image_dir, batch_size=args.batch_size, tags=args.tags,
                              retry_failed=args.retry_failed, progress=not args.no_progress)
        if args.optimize and hasattr(gallery, "optimize"):
            gallery.optimize(retrain=True)
    for path, reason in report.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(f"{args.uri}: {report.summary()}")
    return 0


def _print_hits(hits: list, as_json: bool) -> None:
    if as_json:
        print(json.dumps([{"rank": r + 1, **h.to_dict()} for r, h in enumerate(hits)], indent=2))
    else:
        for r, h in enumerate(hits):
            print(f"{r + 1:>3}  {h.score:.4f}  {h.path}")


def _run_search(client: Any, args: argparse.Namespace) -> int:
    if (args.query is None) == (args.image is None):
        raise InvalidInputError("give a text query, --image PATH or --like PATH (exactly one)")
    with Gallery.open(args.uri) as gallery:
        if args.query is not None:
            hits = gallery.search_text(client, args.query, k=args.top_k, filter=args.filter)[0]
        else:
            hits = gallery.search_image(client, args.image, k=args.top_k, filter=args.filter)[0]
    _print_hits(hits, args.json)
    return 0


def _run_like(args: argparse.Namespace) -> int:
    """search --like PATH: no server needed, the stored embedding is the query."""
    if args.query is not None or args.image is not None:
        raise InvalidInputError("give a text query, --image PATH or --like PATH (exactly one)")
    with Gallery.open(args.uri) as gallery:
        path = args.like if gallery.find([args.like]) else str(Path(args.like).absolute())
        _print_hits(gallery.similar(path, k=args.top_k, filter=args.filter), args.json)
    return 0


def _run_classify(client: Any, args: argparse.Namespace) -> int:
    items: list[bytes] = []
    names: list[str] = []
    failed: list[tuple[str, str]] = []
    for p in args.images:
        try:
            items.append(Path(p).read_bytes())
            names.append(p)
        except OSError as e:
            failed.append((p, f"cannot read: {e.strerror or e}"))
    classes = client.class_embeddings(args.labels, args.templates)  # (C, D)
    scale = client.get_model_info().scale
    good, bad = {}, {}
    limit = client.get_model_info().max_image_items
    for lo in range(0, len(items), limit):
        g, b = encode_tolerant(client, items[lo:lo + limit])
        good.update({lo + i: e for i, e in g.items()})
        bad.update({lo + i: m for i, m in b.items()})
    failed += [(names[i], m) for i, m in sorted(bad.items())]
    order = sorted(good)
    rows = _label_rows([names[i] for i in order], [good[i] for i in order], classes, scale, args)
    _print_labels(rows, failed, args.json)
    return 1 if failed else 0


def _label_rows(paths: list[str], embeds: list[np.ndarray], classes: np.ndarray, scale: float,
                args: argparse.Namespace) -> list[dict]:
    """{path, labels: top-k {label, probability}} per image."""
    if not embeds:
        return []
    probs = ops.softmax(ops.similarity(np.stack(embeds), classes, scale), axis=1)  # (I, C)
    top = ops.topk_indices(probs, args.top_k)
    return [{"path": p, "labels": [{"label": args.labels[c], "probability": float(probs[n, c])} for c in top[n]]}
            for n, p in enumerate(paths)]


def _print_labels(rows: list[dict], failed: list[tuple[str, str]], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"results": rows, "failed": [{"path": p, "error": m} for p, m in failed]}, indent=2))
    else:
        for row in rows:
            print(row["path"] + "\t" + "\t".join(f"{x['label']} {x['probability']:.4f}" for x in row["labels"]))
        for p, m in failed:
            print(f"skipped {p}: {m}", file=sys.stderr)


def _run_classify_gallery(client: Any, args: argparse.Namespace) -> int:
    """classify --uri: zero-shot labels for a gallery's images from their stored embeddings (no image is sent)."""
    classes = client.class_embeddings(args.labels, args.templates)  # (C, D)
    info = client.get_model_info()
    with Gallery.open(args.uri) as gallery:
        gallery.check_identity(info)
        rows = gallery.rows(filter=args.filter, fields=("path",))
        out = []
        for lo in range(0, len(rows), 4096):
            chunk = rows[lo:lo + 4096]
            out += _label_rows([r["path"] for r in chunk], list(gallery.embeddings([r["id"] for r in chunk])), classes,
                               info.scale, args)
    _print_labels(out, [], args.json)
    return 0
