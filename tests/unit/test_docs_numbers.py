"""The numbers the README and docs/ state about defaults are the code's: `--flag` (N) against every clip-triton
command's parser, `name=N` against the clients' keyword defaults, and the retry window against the backoff schedule."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from clip_client._core import ClientBase, backoff_delay
from clip_client.cli import _parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FLAG_DEFAULT = re.compile(r"`(--[a-z0-9-]+)`[^`(\n]{0,30}\(([0-9][0-9.,]*)(?: ([a-zA-Z]+))?\)")
UNITS = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
KEYWORDS = re.compile(r"`(\w+=[\w.]+(?:, \w+=[\w.]+)*)`")
RETRY_WINDOW = re.compile(r"`retries=(\d+), backoff=([\d.]+)`:\s+(\d+)-(\d+) s")


def _text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in DOCS)


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def test_flag_defaults_in_the_docs_are_the_parsers():
    parser = _parser()
    commands = next(a for a in parser._actions if a.choices and "serve" in a.choices).choices
    defaults: dict[str, set] = {}
    for command in commands.values():
        for action in command._actions:
            for flag in action.option_strings:
                defaults.setdefault(flag, set()).add(repr(action.default))
    found = FLAG_DEFAULT.findall(_text())
    assert len(found) >= 10
    for flag, value, unit in found:
        assert flag in defaults, flag
        # a flag several commands share (the gateway's and the OpenAI front end's --max-body-bytes) may default
        # differently in each: the stated number must be one command's default, in bytes where a unit is given
        stated = _number(value) * UNITS.get(unit, 1)
        assert stated in {float(d) for d in defaults[flag]}, (flag, value, unit, defaults[flag])


def test_client_keyword_defaults_in_the_docs_are_the_clients():
    params = inspect.signature(ClientBase.__init__).parameters
    checked = 0
    for group in KEYWORDS.findall(_text()):
        for pair in group.split(", "):
            name, value = pair.split("=")
            if name in params and params[name].default is not inspect.Parameter.empty:
                assert _number(value) == params[name].default, (name, value, params[name].default)
                checked += 1
    assert checked >= 3  # connect_timeout, retries, backoff


def test_the_retry_window_is_the_backoff_schedule(monkeypatch):
    params = inspect.signature(ClientBase.__init__).parameters
    windows = RETRY_WINDOW.findall(_text())
    assert windows
    for retries, backoff, low, high in windows:
        assert (int(retries), float(backoff)) == (params["retries"].default, params["backoff"].default)
        for jitter, stated in ((0.5, low), (1.0, high)):  # backoff_delay draws uniform(0.5, 1) x the delay
            monkeypatch.setattr("random.uniform", lambda a, b, j=jitter: j)
            assert round(sum(backoff_delay(k, float(backoff)) for k in range(int(retries)))) == int(stated)
