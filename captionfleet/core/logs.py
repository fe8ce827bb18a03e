"""Log setup for the long-running worker: plain text for people, or one JSON object per line.

In JSON, the fields a call passes with ``extra=`` (id, uri, kind, topic, partition, offset) become
top-level keys, so a log pipeline can find every line about one request or one offset.

In text, every control character of a record's line (newlines, CR, other C0/C1 controls, U+2028/U+2029)
is written escaped: logged values come from other teams' requests (ids, uris, error messages), and a
newline in one would otherwise start a line that looks like a record of its own (log forging).
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# C0 controls, DEL, C1 controls, and the Unicode line and paragraph separators some viewers break lines at.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    return f"\\x{ord(char):02x}" if ord(char) <= 0xFF else f"\\u{ord(char):04x}"


def escape_controls(text: str) -> str:
    """``text`` on one line: each control character written as its Python escape (``\\n``, ``\\x1b``, ...)."""
    return _CONTROL.sub(_escape_one, text)


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``, one physical line per record: the message is escaped. A traceback or stack keeps
    its own lines, each indented and escaped, so none of them can pass for a record either."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        # logging.Formatter.format, with the escaping; record.exc_text is neither read nor cached, so a
        # handler with another formatter still sees the record as logged.
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        text = escape_controls(self.formatMessage(record))
        blocks = []
        if record.exc_info:
            blocks.append(self.formatException(record.exc_info))
        if record.stack_info:
            blocks.append(self.formatStack(record.stack_info))
        for block in blocks:
            text += "".join("\n  " + escape_controls(line) for line in block.split("\n"))
        return text


# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_"):
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    # force: the console script may have configured logging already; the worker's settings win.
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # kafka-python logs every connection and rebalance step at INFO: keep its warnings only.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLevelName(level)))
