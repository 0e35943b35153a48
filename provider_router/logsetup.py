"""structlog set-up: JSON lines when stderr is not a terminal, a console renderer when it is.

Every string value passes the redactor, so a configured secret never reaches the log output.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable, TextIO

import orjson
import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _redacting(redact: Callable[[str | None], str | None]) -> Callable[..., dict[str, Any]]:
    def processor(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        for k, v in event.items():
            if isinstance(v, str):
                event[k] = redact(v)
        return event

    return processor


def setup_logging(
    level: str = "info",
    *,
    json: bool | None = None,
    stream: TextIO | None = None,
    redact: Callable[[str | None], str | None] | None = None,
) -> None:
    """Configure structlog (and route aiohttp's stdlib logging through the same level)."""
    stream = stream or sys.stderr
    if json is None:
        json = not stream.isatty()
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if redact is not None:
        processors.append(_redacting(redact))
    if json:
        processors += [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer(serializer=orjson.dumps)]
        factory: Any = structlog.BytesLoggerFactory(stream.buffer)
    else:
        processors.append(structlog.dev.ConsoleRenderer())
        factory = structlog.PrintLoggerFactory(stream)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(LEVELS.get(level, logging.INFO), logging.WARNING), stream=stream)
