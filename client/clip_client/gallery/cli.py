"""The `clip-triton index | search` commands (on the Gallery API of this package); `classify --uri` is in
clip_client.classify and calls classify_gallery here."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..cli import EXIT_ERROR, EXIT_OK, EXIT_SOME_FAILED, add_connection_arguments, connect
from ..errors import CLIPClientError, InvalidInputError
from .base import Gallery
from .indexing import index_folder

DEFAULT_URI = "gallery"

COMMAND_HELP = {"index": "index a folder of images into a gallery", "search": "search a gallery by text or image"}
URI_HELP = (
    "gallery: a folder (embedded index, created on first use), a Milvus server http://host:19530 or a "
    "milvus-lite file *.db; '?collection=NAME' picks the Milvus collection"
)


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Arguments of `clip-triton index | search`."""
    if command == "index":
        parser.add_argument("image_dir", help="folder of images (searched recursively) or one image file")
        parser.add_argument("--uri", "--out", dest="uri", default=DEFAULT_URI, help=URI_HELP)
        parser.add_argument(
            "--batch-size",
            type=_non_negative_int,
            default=None,
            help="images per request (default, or 0: the server's limit)",
        )
        parser.add_argument(
            "--tag", action="append", dest="tags", default=None, help="tag every indexed image (repeatable)"
        )
        parser.add_argument("--retry-failed", action="store_true", help="send again the files that failed before")
        parser.add_argument(
            "--prune",
            action="store_true",
            help="also delete the rows of every path in the gallery that is no longer an existing file",
        )
        parser.add_argument(
            "--optimize",
            action="store_true",
            help="afterwards merge small segments and retrain the embedded index for its size",
        )
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    elif command == "search":
        parser.add_argument("query", nargs="?", help="text query")
        parser.add_argument("--image", help="image query (a file) instead of a text")
        parser.add_argument("--like", metavar="PATH", help="images similar to an indexed image (its stored embedding)")
        parser.add_argument("--uri", "--gallery", dest="uri", default=DEFAULT_URI, help=URI_HELP)
        parser.add_argument("--filter", help="e.g. 'size > 100000 and array_contains(tags, \"cat\")' (README: filters)")
        parser.add_argument("-k", "--top-k", type=int, default=10, help="results to show (default 10)")
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
        parser.add_argument("--exact", action="store_true", help="score every image (no approximate index)")
    add_connection_arguments(parser)


def _non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {text!r}")
    return value


def run(args: argparse.Namespace, command: str) -> int:
    """Run one command; the exit status follows cli.EXIT_STATUS (index: 1 when some files were skipped)."""
    try:
        if command == "search" and args.like is not None:
            return _run_like(args)
        with connect(args) as client:
            return {"index": _run_index, "search": _run_search}[command](client, args)
    except CLIPClientError as e:
        print(f"clip-triton {command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR


def _run_index(client: Any, args: argparse.Namespace) -> int:
    if not Path(args.image_dir).exists():
        raise InvalidInputError(f"{args.image_dir} does not exist")
    info = client.get_model_info()
    with Gallery.create(
        args.uri,
        info.dim,
        info.model_id,
        exist_ok=True,
        logit_scale=info.logit_scale,
        identity_source=info.identity_source,
    ) as gallery:
        report = index_folder(
            client,
            gallery,
            args.image_dir,
            batch_size=args.batch_size,
            tags=args.tags,
            retry_failed=args.retry_failed,
            progress=not args.no_progress,
            prune=args.prune,
        )
        if args.optimize and hasattr(gallery, "optimize"):
            gallery.optimize(retrain=True)
        elif args.optimize:
            print(
                f"clip-triton index: --optimize ignored: {args.uri} is a Milvus gallery (Milvus compacts and indexes "
                "by itself)",
                file=sys.stderr,
            )
    for path, reason in report.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(f"{args.uri}: {report.summary()}")
    return EXIT_SOME_FAILED if report.skipped else EXIT_OK


def _print_hits(hits: list, as_json: bool) -> None:
    if as_json:
        print(json.dumps([{"rank": r + 1, **h.to_dict()} for r, h in enumerate(hits)], indent=2))
    elif not hits:
        print("no match")
    else:
        for r, h in enumerate(hits):
            print(f"{r + 1:>3}  {h.score:.4f}  {h.path}")


def _run_search(client: Any, args: argparse.Namespace) -> int:
    if (args.query is None) == (args.image is None):
        raise InvalidInputError("give a text query, --image PATH or --like PATH (exactly one)")
    with Gallery.open(args.uri) as gallery:
        if args.query is not None:
            hits = gallery.search_text(client, args.query, k=args.top_k, filter=args.filter, exact=args.exact)[0]
        else:
            hits = gallery.search_image(client, args.image, k=args.top_k, filter=args.filter, exact=args.exact)[0]
    _print_hits(hits, args.json)
    return 0


def _run_like(args: argparse.Namespace) -> int:
    """search --like PATH: no server needed, the stored embedding is the query."""
    if args.query is not None or args.image is not None:
        raise InvalidInputError("give a text query, --image PATH or --like PATH (exactly one)")
    with Gallery.open(args.uri) as gallery:
        path = args.like if gallery.find([args.like]) else str(Path(args.like).absolute())
        hits = gallery.similar(path, k=args.top_k + 1, filter=args.filter, exact=args.exact)  # the query image
        _print_hits([h for h in hits if h.path != path][: args.top_k], args.json)  # itself is left out
    return 0


def classify_gallery(
    client: Any, uri: str, labels: list[str], templates: list[str] | None, top_k: int | None, filter: str | None = None
) -> list[dict]:
    """[{"path", "labels": [{label, score}] best first}] for a gallery's images (those matching the filter), from
    their stored embeddings: no image is read or sent."""
    with Gallery.open(uri) as gallery:
        gallery.check_identity(client.get_model_info())
        rows = gallery.rows(filter=filter, fields=("path",))
        out: list[dict] = []
        for lo in range(0, len(rows), 4096):
            chunk = rows[lo : lo + 4096]
            ranked = client.classify(gallery.embeddings([r["id"] for r in chunk]), labels, templates, top_k)
            out += [{"path": r["path"], "labels": labs} for r, labs in zip(chunk, ranked)]
    return out
