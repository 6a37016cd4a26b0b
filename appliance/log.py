"""Structured logging: one event per line (logfmt or JSON) on stderr, which journald collects.

    log = get_logger("storage")
    log.info("instance.stored", bytes=27262976, calling_ae="HOLOGIC1")
    log.error("instance.failed", phase="fsync", error=str(exc))

Patient names and IDs are never logged at INFO: callers log UIDs and accession numbers only.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


class _EventFormatter(logging.Formatter):
    def __init__(self, style: str) -> None:
        super().__init__()
        self._render = _json if style == "json" else _logfmt

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": record.name.removeprefix("appliance."),
            "event": record.getMessage(),
        }
        fields.update(getattr(record, "fields", {}))
        if record.exc_info and record.exc_info[1] is not None:
            fields.setdefault("error", f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}")
            fields["traceback"] = self.formatException(record.exc_info)
        return self._render(fields)


def _json(fields: dict[str, Any]) -> str:
    return json.dumps(fields, default=str, ensure_ascii=False)


def _logfmt(fields: dict[str, Any]) -> str:
    parts = []
    for key, value in fields.items():
        text = "" if value is None else str(value)
        if not text or any(c in text for c in ' ="\n\\'):
            text = json.dumps(text, ensure_ascii=False)  # quotes and escapes newlines: one line
        parts.append(f"{key}={text}")
    return " ".join(parts)


class EventLogger:
    """A stdlib logger that takes an event name and keyword fields."""

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(f"appliance.{name}")

    def _log(self, level: int, event: str, exc_info: bool, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, exc_info=exc_info, extra={"fields": fields})

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, False, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, False, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, False, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, False, fields)

    def exception(self, event: str, **fields: Any) -> None:
        """An error with the current exception's traceback (escaped onto the same line)."""
        self._log(logging.ERROR, event, True, fields)


def get_logger(name: str) -> EventLogger:
    return EventLogger(name)


def configure(level: str = "INFO", style: str = "logfmt") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_EventFormatter(style))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom narrates every PDU at INFO and dumps identifiers (patient data) at DEBUG:
    # keep it to real problems unless we are debugging ourselves.
    logging.getLogger("pynetdicom").setLevel("DEBUG" if level == "DEBUG" else "WARNING")
