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
import threading
import time
from types import TracebackType
from typing import Any

from appliance import errors

#: The keys every event line starts with.
RESERVED = frozenset({"ts", "level", "service", "event"})


class _EventFormatter(logging.Formatter):
    def __init__(self, style: str) -> None:
        super().__init__()
        self._json = style == "json"
        self._render = _json if self._json else _logfmt

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": record.name.removeprefix("appliance."),
            "event": record.getMessage(),
        }
        for key, value in getattr(record, "fields", {}).items():
            # A caller's field never overwrites the event's own keys (a `level=STUDY` would
            # replace the severity): it keeps its value under a suffixed name.
            fields[f"{key}_" if key in RESERVED else key] = value
        if record.exc_info and record.exc_info[1] is not None:
            fields.setdefault("error", errors.describe(record.exc_info[1]))
            text = self.formatException(record.exc_info)
            # Folded into the event: an array in JSON; in logfmt one escaped string.
            fields["traceback"] = text.splitlines() if self._json else text
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
    logging.captureWarnings(True)
    _route_stray_tracebacks()
    # pynetdicom narrates every PDU at INFO and dumps identifiers (patient data) at DEBUG:
    # keep it to real problems unless we are debugging ourselves.
    logging.getLogger("pynetdicom").setLevel("DEBUG" if level == "DEBUG" else "WARNING")


def _route_stray_tracebacks() -> None:
    """Exceptions nobody caught (a pynetdicom thread, an interpreter shutdown, a finalizer)
    become one event each with the traceback folded in, never raw lines on stderr that
    journald would split into unrelated entries."""
    stray = get_logger("python")

    def log_uncaught(
        kind: type[BaseException], value: BaseException, tb: TracebackType | None
    ) -> None:
        stray._logger.error(
            "exception.uncaught",
            exc_info=(kind, value, tb),
            extra={"fields": {"phase": "run", "thread": threading.current_thread().name}},
        )

    def log_thread(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is None or isinstance(args.exc_value, SystemExit):
            return
        thread = args.thread.name if args.thread else "?"
        stray._logger.error(
            "thread.crashed",
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
            extra={"fields": {"phase": "run", "thread": thread}},
        )

    def log_unraisable(unraisable: Any) -> None:
        value = unraisable.exc_value
        stray._logger.warning(
            "exception.unraisable",
            exc_info=(unraisable.exc_type, value, unraisable.exc_traceback) if value else None,
            extra={"fields": {"phase": "run", "where": str(unraisable.err_msg or "")[:200]}},
        )

    sys.excepthook = log_uncaught
    threading.excepthook = log_thread
    sys.unraisablehook = log_unraisable
