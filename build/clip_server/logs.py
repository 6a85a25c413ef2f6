"""Structured logs: one JSON object per line (time, level, logger, message, and request_id when a record has one)."""

from __future__ import annotations

import json
import logging
import time


class JsonFormatter(logging.Formatter):
    """A log record as one JSON line; `extra={"request_id": ...}` adds the request's x-request-id."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as JSON (exception text included when there is one)."""
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            out["request_id"] = request_id
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def use_json_logs() -> None:
    """Every handler of the root logger writes JSON lines from now on."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO)
    for handler in root.handlers:
        handler.setFormatter(JsonFormatter())
