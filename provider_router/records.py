"""The request record: one per request to /v1/*, filled along the request path.

It crosses modules (middleware, handlers, writer), so it is a plain slotted dataclass.
"""

from __future__ import annotations

import operator
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any


_last = [0, 0]  # last millisecond used, sequence within it


def new_id() -> str:
    """A sortable id, 28 hex digits: 48-bit milliseconds, a 16-bit sequence, 48 random bits.

    Ids from one process sort in creation order, even within a millisecond.
    """
    ms = time.time_ns() // 1_000_000
    if ms <= _last[0]:
        ms, seq = _last[0], _last[1] + 1
        if seq > 0xFFFF:
            ms, seq = ms + 1, 0
    else:
        seq = 0
    _last[0], _last[1] = ms, seq
    # Uniqueness comes from time + sequence; the random tail only separates processes.
    # One number formatted once: the three fields side by side, each in its own digits.
    return f"{ms << 64 | seq << 48 | random.getrandbits(48):028x}"


_iso_seconds: dict[int, str] = {}  # whole seconds formatted lately, and their text


def iso(ts: float) -> str:
    """ISO 8601 UTC with milliseconds: sortable as text, readable in sqlite3.

    Formatting a datetime costs microseconds and runs several times per request, so the
    text of recent whole seconds is cached and only the milliseconds are appended (a
    session's save alone formats three different seconds: created, now, expiry).
    """
    sec = int(ts)
    us = round((ts - sec) * 1e6)  # as datetime does: round to microseconds, then cut to ms
    if us >= 1_000_000:
        sec, us = sec + 1, us - 1_000_000
    text = _iso_seconds.get(sec)
    if text is None:
        if len(_iso_seconds) >= 256:
            _iso_seconds.clear()
        text = _iso_seconds[sec] = datetime.fromtimestamp(sec, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{us // 1000:03d}Z"


@dataclass(slots=True)
class RequestRecord:
    method: str
    path: str
    id: str = field(default_factory=new_id)
    started: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.perf_counter)
    finished: float | None = None
    client: str | None = None
    user_agent: str | None = None
    model: str | None = None
    provider: str | None = None
    upstream_model: str | None = None
    stream: bool | None = None
    request_body: bytes | None = None
    response_body: bytes | None = None
    # A translated reply's text, for the threads (the log reads `response_body`).
    response_text: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    chunk_count: int | None = None
    status: int | None = None
    outcome: str | None = None
    error: str | None = None
    ttfb_ms: float | None = None
    duration_ms: float | None = None
    session_id: str | None = None
    turn: int | None = None
    chat_id: str | None = None
    parent_id: str | None = None
    reply_id: str | None = None
    attempts: list[dict[str, Any]] | None = None
    # The forwarded SSE body, assembled into the reply by the log writer process, and how
    # many bytes of it were not kept (past the log's bound for one stream).
    stream_body: bytes | None = None
    stream_cut: int = 0
    # How the writer reads the reply: "completion" (`response_body`), "stream"
    # (`stream_body`), or None (the response body is kept as it is).
    reply_format: str | None = None
    # Whether the request's session has (or will have) a row: a one-shot request on a
    # stateless upstream pays for no session bookkeeping; its session is stored, and this
    # request joined to it, only when a second request continues it.
    log_session: bool = True
    # The request that started this one's session, when its row was written before the
    # session was stored: the writer joins it to the session.
    attach: str | None = None
    # Handed to the log writer process (what changes on this object now stays here).
    handed: bool = False
    # The writer process renders the request's canonical log line when this is set: the
    # line is a view of the record, and rendering it costs the event loop nothing.
    log_line: bool = False

    def first_byte(self) -> None:
        if self.ttfb_ms is None:
            self.ttfb_ms = (time.perf_counter() - self.started_mono) * 1000.0

    def finish(self, status: int, outcome: str, error: str | None = None) -> None:
        self.status = status
        if self.outcome is None:
            self.outcome = outcome
        if error is not None and self.error is None:
            self.error = error
        self.finished = time.time()
        self.duration_ms = (time.perf_counter() - self.started_mono) * 1000.0


_FIELDS = tuple(RequestRecord.__slots__)
# Records cross to the writer process in pickled batches as plain tuples of their fields
# (`as_fields`, then `from_fields` there): a tuple pickles faster than the default slots state
# (a dict per record) and than a `__reduce__` per record (a Python call and a global each),
# and one attrgetter call builds it faster than a getattr per field (bench/README.md).
as_fields = operator.attrgetter(*_FIELDS)


def request_line(r: RequestRecord) -> dict[str, Any]:
    """The fields of a request's canonical log line (event `request`)."""
    return {
        "request_id": r.id,
        "method": r.method,
        "path": r.path,
        "status": r.status,
        "outcome": r.outcome,
        "model": r.model,
        "provider": r.provider,
        "client": r.client,
        "session": r.session_id,
        "ttfb_ms": None if r.ttfb_ms is None else round(r.ttfb_ms, 2),
        "duration_ms": round(r.duration_ms or 0.0, 2),
        "timestamp": iso(r.finished or r.started),
    }


def from_fields(values: tuple[Any, ...]) -> RequestRecord:
    """A record from `as_fields(record)`: every field, in declaration order (no defaults run)."""
    return RequestRecord(*values)
