"""structlog set-up: JSON lines when stderr is not a terminal, a console renderer when it is.

The rendered line passes the redactor, so a configured secret never reaches the log output.
Writing a line never raises: a reader that went away (`serve 2>&1 | head`) costs the lines,
not the code that logged them (a cleanup step, a signal handler).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Callable, TextIO

import orjson
import structlog

from .records import iso
from .redact import Redactor

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# Per-row failures of the log writer: on a full disk one each per record. One line of each
# per interval passes (with the count it stood for); the health monitor sums them up.
THROTTLED = frozenset({"log_write_failed", "log_batch_failed", "log_record_failed"})
THROTTLE_SECONDS = 10.0


class SafeStream:
    """A stream (text or bytes) whose write and flush never raise. On the first failure it
    goes quiet, and if it was fd 2 that fd becomes /dev/null: processes started later
    (a new log writer) and the interpreter's exit flush then never meet the broken pipe."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.broken = False

    def write(self, data: Any) -> int:
        if not self.broken:
            try:
                return int(self._raw.write(data) or 0)
            except (OSError, ValueError):  # EPIPE, EIO, ENOSPC; ValueError: closed
                self._break()
        return len(data)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._raw.flush()
            except (OSError, ValueError):
                self._break()

    def isatty(self) -> bool:
        try:
            return bool(self._raw.isatty())
        except (OSError, ValueError):
            return False

    def _break(self) -> None:
        self.broken = True
        try:
            if self._raw.fileno() == 2:
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 2)
                os.close(null)
        except (OSError, ValueError, AttributeError):
            pass


def _throttle(seconds: float) -> Callable[..., Any]:
    """Let one line of each THROTTLED event through per `seconds`; the next carries
    `suppressed`, how many were dropped since."""
    last: dict[str, float] = {}
    dropped: dict[str, int] = {}

    def processor(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        name = event.get("event")
        if name not in THROTTLED:
            return event
        now = time.monotonic()
        if now - last.get(name, -seconds) < seconds:
            dropped[name] = dropped.get(name, 0) + 1
            raise structlog.DropEvent
        last[name] = now
        if dropped.get(name):
            event["suppressed"] = dropped.pop(name)
        return event

    return processor


def _timestamp(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    # The cached-second ISO formatter (`records.iso`) costs less than TimeStamper's. A line rendered
    # later from a record (the writer process) brings the time it happened.
    if "timestamp" not in event:
        event["timestamp"] = iso(time.time())
    return event


def _redacted(render: Callable[..., Any], redactor: Redactor) -> Callable[..., Any]:
    """Redact the finished line: one scan of the output instead of one per field."""

    def processor(logger: Any, name: str, event: dict[str, Any]) -> Any:
        out = render(logger, name, event)
        return redactor.bytes(out) if isinstance(out, bytes) else redactor(out)

    return processor


def setup_logging(
    level: str = "info",
    *,
    json: bool | None = None,
    stream: TextIO | None = None,
    redact: Redactor | None = None,
) -> None:
    """Configure structlog (and route aiohttp's stdlib logging through the same level)."""
    stream = stream or sys.stderr
    if json is None:
        json = not stream.isatty()
    processors: list[Any] = [
        _throttle(THROTTLE_SECONDS),
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _timestamp,
    ]
    render: Callable[..., Any]
    if json:
        processors.append(structlog.processors.dict_tracebacks)
        render = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        factory: Any = structlog.BytesLoggerFactory(SafeStream(stream.buffer))
    else:
        render = structlog.dev.ConsoleRenderer()
        factory = structlog.PrintLoggerFactory(SafeStream(stream))
    processors.append(_redacted(render, redact) if redact is not None else render)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    _route_stdlib(level, stream, json=json, redact=redact)


def line_renderer(level: str = "info", *, encoding: str | None = None) -> Callable[[str, dict[str, Any]], bytes]:
    """The configured processors as one function: an event and its fields to the bytes the
    logger would write, line end included. For writing many lines with one call (the log
    writer process renders a batch's request lines at once); call after `setup_logging`.
    `encoding` is the stream's, for the console renderer's text (stderr's errors policy)."""
    processors = structlog.get_config()["processors"]
    encoding = encoding or "utf-8"

    def render(event: str, fields: dict[str, Any]) -> bytes:
        out: Any = {**fields, "event": event}
        for processor in processors:
            out = processor(None, level, out)
        return (out if isinstance(out, bytes) else out.encode(encoding, "backslashreplace")) + b"\n"

    return render


def _route_stdlib(level: str, stream: TextIO, *, json: bool, redact: Redactor | None) -> None:
    """aiohttp and asyncio log through stdlib logging (parse errors quote the request's
    headers): render those records like ours, as JSON lines or console, and redacted."""
    render: Callable[..., Any] = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )  # stdlib handlers write text, so the str-producing renderers here
    formatter = structlog.stdlib.ProcessorFormatter(
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _redacted(render, redact) if redact is not None else render,
        ],
        foreign_pre_chain=[structlog.stdlib.add_logger_name, structlog.processors.add_log_level, _timestamp],
    )
    handler = logging.StreamHandler(SafeStream(stream))  # type: ignore[arg-type]
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(LEVELS.get(level, logging.INFO), logging.WARNING))
