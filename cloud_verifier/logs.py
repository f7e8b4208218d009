"""The verifier's log lines: one JSON object or one text line per record, each naming its session.

The session registry sets `SESSION_ID` when it registers a session, so every line the call logs
afterwards carries that id; `logged_session` writes the one line per session opening and closing.
`specbridge serve` installs the handler with `configure_logging`; prompt text is logged only on request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import IO, Any

from shared.decoding import DecodeMode
from shared.wire import FinishReason

# Set, never reset: a gRPC call runs in a task of its own, whose context ends with the call.
SESSION_ID: ContextVar[str | None] = ContextVar("specbridge_session_id", default=None)
session_log = logging.getLogger("cloud_verifier.sessions")


class LogFormat(Enum):
    TEXT = "text"
    JSON = "json"


class SessionIdFilter(logging.Filter):
    """Stamps each record with the session id of the context that logs it (an explicit `extra` one wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "session_id"):
            record.session_id = SESSION_ID.get()
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's structured values: `log.info(message, extra={"fields": {...}})`."""
    return getattr(record, "fields", {})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name, "session_id": getattr(record, "session_id", None),
                 "message": record.getMessage(), **_fields(record)}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(session)s: %(message)s%(values)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        session_id = getattr(record, "session_id", None)
        record.session = f" session={session_id}" if session_id else ""
        # Strings quoted (JSON-escaped): a prompt or an error message may hold spaces and newlines.
        record.values = "".join(f" {key}={json.dumps(value, ensure_ascii=False) if isinstance(value, str) else value}"
                                for key, value in _fields(record).items())
        return super().formatMessage(record)


def log_handler(log_format: LogFormat, stream: IO[str]) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    handler.addFilter(SessionIdFilter())
    handler.setFormatter(JsonFormatter() if log_format is LogFormat.JSON else TextFormatter())
    return handler


class LogLevel(Enum):
    DEBUG = "debug"
    INFO = "info"  # a line per session opened and closed, and per rejected call
    WARNING = "warning"  # rejected calls and failures only
    ERROR = "error"


def configure_logging(log_format: LogFormat, level: LogLevel = LogLevel.INFO) -> None:
    """The serve process's logging: lines at `level` and above to stderr (stdout carries the ready line)."""
    logging.basicConfig(level=level.name, handlers=[log_handler(log_format, sys.stderr)], force=True)


@dataclass
class SessionTally:
    """What the closing line reports, gathered while the session runs."""

    rounds: int = 0
    committed_tokens: int = 0
    finish_reason: FinishReason | None = None

    def observe(self, committed_tokens: int, finish_reason: FinishReason | None) -> None:
        self.rounds += 1
        self.committed_tokens += committed_tokens
        self.finish_reason = finish_reason


@contextmanager
def logged_session(session_id: str, rpc: str, prompt_tokens: int, mode: DecodeMode,
                   prompt: str | None) -> Iterator[SessionTally]:
    """One line when the session opens, one when it closes for any reason; `prompt`: None keeps it out of the log."""
    opened = {"rpc": rpc, "prompt_tokens": prompt_tokens, "mode": mode.value}
    session_log.info("session opened", extra={"session_id": session_id,
                                              "fields": opened if prompt is None else {**opened, "prompt": prompt}})
    started = time.perf_counter()
    tally = SessionTally()
    ended: dict[str, str] = {}
    try:
        yield tally
    except (asyncio.CancelledError, GeneratorExit):
        ended = {"finish_reason": "cancelled"}
        raise
    except Exception as error:
        ended = {"finish_reason": "error", "error": type(error).__name__}
        raise
    finally:
        if not ended:
            # A Speculate stream the client ends before the verifier finishes it: a stop sequence, say.
            ended = {"finish_reason": tally.finish_reason.value if tally.finish_reason else "client_closed"}
        session_log.info("session closed", extra={"session_id": session_id, "fields": {
            "rpc": rpc, "prompt_tokens": prompt_tokens, "mode": mode.value, "rounds": tally.rounds,
            "committed_tokens": tally.committed_tokens, **ended,
            "duration_ms": round((time.perf_counter() - started) * 1e3, 3)}})
