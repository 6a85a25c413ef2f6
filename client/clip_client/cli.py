"""The `clip-triton` command line.

The client's own commands (index, search, classify) are always here. The server-side commands (convert, build,
serve, demo, bench, ...) come with the full install: each distribution lists its commands under the entry-point
group `clip_triton.commands` (name = command, value = the module), so this module never imports them by name.
A command module defines add_arguments(parser, command), run(args, command) -> int and COMMAND_HELP, and keeps
heavy imports inside functions so that --help stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from importlib.metadata import entry_points

GROUP = "clip_triton.commands"
BUILTIN = {"index": "clip_client.gallery", "search": "clip_client.gallery", "classify": "clip_client.gallery"}
# Order in --help; commands not listed here follow alphabetically.
ORDER = ("demo", "convert", "build", "serve", "gateway", "bench", "index", "search", "classify")


def commands() -> dict[str, str]:
    """command -> module: the built-in ones plus every installed distribution's entry points."""
    found = dict(BUILTIN)
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, ep.value.split(":")[0])
    rank = {name: i for i, name in enumerate(ORDER)}
    return dict(sorted(found.items(), key=lambda kv: (rank.get(kv[0], len(ORDER)), kv[0])))


def _parser(table: dict[str, str] | None = None) -> argparse.ArgumentParser:
    table = commands() if table is None else table
    parser = argparse.ArgumentParser(prog="clip-triton", description="Serve and use CLIP-style dual encoders on Triton.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in table.items():
        module = importlib.import_module(module_name)
        help_text = getattr(module, "COMMAND_HELP", {}).get(name, "")
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    table = commands()
    args = _parser(table).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(table[args.command])
    return int(module.run(args, args.command) or 0)


if __name__ == "__main__":
    sys.exit(main())
