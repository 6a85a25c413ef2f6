"""The `clip-triton` command line.

The client's own commands (index, search, classify) are always here. The server-side commands (convert, build,
serve, demo, bench, ...) come with the full install: each distribution lists its commands under the entry-point
group `clip_triton.commands` (name = command, value = the module), so this module never imports them by name.
A command module defines add_arguments(parser, command), run(args, command) -> int and COMMAND_HELP, and keeps
heavy imports inside functions so that --help stays fast. Every option's default is shown by --help (added here).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from importlib.metadata import PackageNotFoundError, entry_points, version

GROUP = "clip_triton.commands"
BUILTIN = {
    "index": "clip_client.gallery.cli",
    "search": "clip_client.gallery.cli",
    "classify": "clip_client.classify",
    "gallery-info": "clip_client.gallery.admin",
    "gallery-check": "clip_client.gallery.admin",
}
# Order in --help; commands not listed here follow alphabetically.
ORDER = ("demo", "convert", "build", "serve", "gateway", "bench", "index", "search", "classify")
DISTRIBUTIONS = ("clip-triton", "clip-triton-client")  # the full install, the client alone


def commands() -> dict[str, str]:
    """command -> module: the built-in ones plus every installed distribution's entry points."""
    found = dict(BUILTIN)
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, ep.value.split(":")[0])
    rank = {name: i for i, name in enumerate(ORDER)}
    return dict(sorted(found.items(), key=lambda kv: (rank.get(kv[0], len(ORDER)), kv[0])))


def version_text() -> str:
    """'<distribution> <version>' of the installed clip-triton (full install first, else the client alone)."""
    for dist in DISTRIBUTIONS:
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return "clip-triton (not installed: running from a source tree)"


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append '(default: X)' to the help of every option taking a value that has a default its help does not mention
    already (0 included: only flags, which take no value, and options without a default are left as they are)."""
    for action in parser._actions:  # argparse has no public iterator over a parser's actions
        default = action.default
        if action.nargs == 0 or default is None or default is argparse.SUPPRESS or action.help == argparse.SUPPRESS:
            continue
        if isinstance(default, (list, tuple)) and not default:
            continue
        if "default" in (action.help or "").lower():
            continue
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
        action.help = f"{action.help} (default: {shown})" if action.help else f"default: {shown}"


# One exit-status rule for the client's commands (index, search, classify); also in their --help and the README.
EXIT_STATUS = (
    'exit status: 0 when everything was done (a search with no match included: it says "no match"); '
    "1 when some files were skipped or failed (each listed on stderr, the rest done); "
    "2 when an error stopped the command"
)
EXIT_OK, EXIT_SOME_FAILED, EXIT_ERROR = 0, 1, 2


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """--url, --protocol, --model, --ca-file and --timeout: how every client command reaches the server (and the
    exit-status rule in its --help)."""
    parser.epilog = EXIT_STATUS
    parser.add_argument(
        "--url",
        default=None,
        help="server URL; the scheme picks the protocol: grpc://HOST:PORT, grpcs:// (TLS), http://, "
        "https:// (TLS); a bare HOST:PORT is gRPC (default: grpc://127.0.0.1:8001)",
    )
    parser.add_argument(
        "--protocol",
        choices=("grpc", "http"),
        default=None,
        help="protocol of a bare HOST:PORT --url (default: grpc; a scheme in --url decides itself)",
    )
    parser.add_argument(
        "--model",
        default=None,
        metavar="NAME",
        help="which model of a server that serves several (by name, as its clip_info lists them; "
        "default: the repository's first model)",
    )
    parser.add_argument(
        "--ca-file",
        default=None,
        metavar="PEM",
        help="CA certificates that sign the server's TLS certificate (default: the system's)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds per request to the server, in all (connecting, waiting, reading and retries)",
    )


def connect(args: argparse.Namespace):
    """A CLIPClient for the connection arguments (see add_connection_arguments)."""
    from .client import CLIPClient

    return CLIPClient(
        args.url, protocol=args.protocol, timeout=args.timeout, ca_file=args.ca_file, model=getattr(args, "model", None)
    )


def _parser(table: dict[str, str] | None = None) -> argparse.ArgumentParser:
    table = commands() if table is None else table
    parser = argparse.ArgumentParser(
        prog="clip-triton", description="Serve and use CLIP-style dual encoders on Triton."
    )
    parser.add_argument("-V", "--version", action="version", version=version_text())
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in table.items():
        module = importlib.import_module(module_name)
        help_text = getattr(module, "COMMAND_HELP", {}).get(name, "")
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p, name)
        show_defaults(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    table = commands()
    args = _parser(table).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    module = importlib.import_module(table[args.command])
    return int(module.run(args, args.command) or 0)


if __name__ == "__main__":
    sys.exit(main())
