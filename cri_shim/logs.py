"""Structured logging: one line per event, as key=value text or JSON.

Call sites pass an event name and fields (`log_event(log, "rpc", rpc=..., pod=...)`)
so that operators can grep or parse by pod and container id.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

_FIELDS = "cri_fields"


def _timestamp(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int((created % 1) * 1_000_000):06d}Z"


# Whatever would break a line apart or reach a terminal raw (NUL, CR, ESC, DEL, C1
# controls, Unicode line separators) makes a value quoted, and quoting escapes it.
_NEEDS_QUOTING = re.compile('[\\s"=\x00-\x1f\x7f-\x9f\u2028\u2029]')


def _escaped_json(value: Any) -> str:
    """JSON text with every control character escaped (json leaves DEL raw)."""
    return json.dumps(value, default=str).replace("\x7f", "\\u007f")


def _quote(value: Any) -> str:
    text = str(value)
    if text == "" or _NEEDS_QUOTING.search(text):
        return _escaped_json(text)
    return text


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, _FIELDS, {})
        parts = [
            _timestamp(record.created),
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={_quote(record.getMessage())}",
        ]
        parts += [f"{key}={_quote(value)}" for key, value in fields.items()]
        if record.exc_info:
            parts.append(f"error_trace={_escaped_json(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        payload.update(getattr(record, _FIELDS, {}))
        if record.exc_info:
            payload["error_trace"] = self.formatException(record.exc_info)
        return _escaped_json(payload)


def configure(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpclib logs every cancelled stream at INFO; those are routine here.
    for noisy in ("grpclib", "hpack", "h2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log_event(
    logger: logging.Logger,
    message: str,
    *,
    level: int = logging.INFO,
    exc_info: bool = False,
    **fields: Any,
) -> None:
    if logger.isEnabledFor(level):
        clean = {key: value for key, value in fields.items() if value not in (None, "")}
        logger.log(level, message, extra={_FIELDS: clean}, exc_info=exc_info)
