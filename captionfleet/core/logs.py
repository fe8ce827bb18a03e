"""Log setup for the long-running worker: plain text for people, or one JSON object per line.

In JSON, the fields a call passes with ``extra=`` (id, uri, kind, topic, partition, offset) become
top-level keys, so a log pipeline can find every line about one request or one offset.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

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
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # force: the console script may have configured logging already; the worker's settings win.
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # kafka-python logs every connection and rebalance step at INFO: keep its warnings only.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLevelName(level)))
