"""Log formats of the long-running processes: ``--log-format text`` (default) or ``json``.

``json`` writes one object per line: ``time`` (UTC, ISO 8601, milliseconds),
``level``, ``logger``, ``message``, then whichever of :data:`CONTEXT` the log
call passed with ``extra=`` (``log.warning("...", extra={"chunk": cid, "path":
path})``), and ``exc`` with the traceback when there is one. ``meta``,
``node`` and ``mount`` take the flag, and ``up`` hands it to its children.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Request context a log call may pass with ``extra=``: chunk id, cache path, RPC or HTTP method, node id,
#: source URL, FUSE operation.
CONTEXT = ("chunk", "path", "method", "node", "source", "op")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        ms = int(record.msecs)
        doc: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{ms:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in CONTEXT:
            value = record.__dict__.get(key)
            if value is not None:
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=FORMATS, default="text",
                        help="text (default, for people) or json (one object per line, for log collectors)")


def configure(fmt: str | None, level: int | None = None) -> None:
    """Make the root logger write *fmt* (``text`` or ``json``); *level* when given.

    Keeps the handlers already set up (``sdcache``'s own ``basicConfig``) and
    only swaps their formatter; adds a stderr handler when there is none.
    """
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format=TEXT_FORMAT)
    if level is not None:
        root.setLevel(level)
    formatter = JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)
    for handler in root.handlers:
        handler.setFormatter(formatter)
