"""klog-like text or JSON logs on stderr, with klog's numeric verbosity.

Verbosity maps onto logging levels: 0 → WARNING, 1-2 → INFO, 3+ → DEBUG. Text lines read like
klog's: ``I1121 13:27:01.123456  1234 file.py:42] message``.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time


class KlogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = time.localtime(record.created)
        head = (f"{record.levelname[0]}{time.strftime('%m%d %H:%M:%S', t)}"
                f".{int(record.created % 1 * 1_000_000):06d} {os.getpid():>7} "
                f"{record.filename}:{record.lineno}] ")
        text = head + record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": round(record.created, 6), "level": record.levelname.lower(),
               "logger": record.name, "caller": f"{record.filename}:{record.lineno}",
               "msg": record.getMessage()}
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def level_for(verbosity: int) -> int:
    return logging.WARNING if verbosity <= 0 else logging.INFO if verbosity <= 2 else \
        logging.DEBUG


def setup(fmt: str = "text", verbosity: int = 2) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KlogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_for(verbosity))
    for noisy in ("urllib3", "requests"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class Once:
    """Log a message once per key (malformed input is logged once, then only counted)."""

    def __init__(self, limit: int = 1024) -> None:
        self._seen: set[object] = set()
        self._limit = limit

    def __call__(self, key: object) -> bool:
        if key in self._seen or len(self._seen) >= self._limit:
            return False
        self._seen.add(key)
        return True
