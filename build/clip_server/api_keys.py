"""Bearer API keys shared by `clip-triton openai` and `clip-triton gateway` (standard library only: the gateway
image installs our packages without their dependencies)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

API_KEYS_ENV = "CLIP_TRITON_API_KEYS"


class APIKeyError(RuntimeError):
    """An API key file that cannot be read."""


def load_api_keys(keys: Sequence[str] = (), key_file: str | None = None, env: bool = True) -> list[str]:
    """Every API key: the flags', the file's (one per line, '#' comments) and $CLIP_TRITON_API_KEYS' (commas)."""
    found = [k.strip() for k in keys if k and k.strip()]
    if key_file:
        try:
            lines = Path(key_file).read_text(encoding="utf-8-sig").splitlines()  # a BOM (Notepad) is no key
        except (OSError, UnicodeDecodeError) as exc:
            raise APIKeyError(f"cannot read --api-key-file {key_file}: {exc.__class__.__name__}") from None
        found += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if env:
        found += [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    return list(dict.fromkeys(found))


def add_key_arguments(parser) -> None:
    """--api-key / --api-key-file (the gateway, the front end and `serve --openai-port`)."""
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help=f"accepted bearer API key (repeatable; also ${API_KEYS_ENV}, comma-separated)",
    )
    parser.add_argument("--api-key-file", default=None, metavar="FILE", help="file of API keys, one per line")
