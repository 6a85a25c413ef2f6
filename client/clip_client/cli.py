"""The `clip-triton` command line: one subcommand per module, imported only when it runs."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> (module, one-line help). Each module defines add_arguments(parser, command) and
# run(args, command) -> int, and keeps torch/transformers imports inside functions so --help stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("clip_build.convert", "convert a Hugging Face checkpoint into Parquet weights"),
    "build": ("clip_build.repository", "build a Triton model repository (TorchScript encoders) from Parquet weights"),
    "serve": ("clip_build.serve", "serve a model repository on the embedded Triton server"),
    "demo": ("clip_build.demo", "convert, build, serve and show a zero-shot result (the main job)"),
    "bench": ("clip_build.bench", "benchmark Triton against the in-process transformers pipeline"),
    "index": ("clip_client.gallery", "index a folder of images into a Parquet gallery"),
    "search": ("clip_client.gallery", "search a Parquet gallery by text or image"),
    "classify": ("clip_client.gallery", "zero-shot classify images against labels"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clip-triton", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module_name).add_arguments(p, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args, args.command) or 0)


if __name__ == "__main__":
    sys.exit(main())
