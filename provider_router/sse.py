"""Incremental server-sent-events parsing and encoding.

The parser takes bytes as the network delivers them (split anywhere, even inside a
UTF-8 character or a line ending) and yields whole events once their blank line arrives.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: str
    event: str = ""
    id: str = ""


class SSEParser:
    """Buffers bytes until an event's terminating blank line (``\\n\\n``, ``\\r\\n\\r\\n``, ``\\r\\r``).

    >>> p = SSEParser()
    >>> p.feed(b"data: a\\n") + p.feed(b"\\ndata: b")
    [SSEEvent(data='a', event='', id='')]
    """

    __slots__ = ("_buf", "_data", "_event", "_id", "_pending_cr")

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []
        self._event = ""
        self._id = ""
        self._pending_cr = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Add bytes; return the events they complete, in order."""
        if not chunk:
            return []
        if self._pending_cr:
            # A CR ended the previous chunk; a following LF belongs to the same line ending.
            self._pending_cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        buf = self._buf + chunk
        if b"\r" in buf:
            if buf.endswith(b"\r"):
                self._pending_cr = True
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events: list[SSEEvent] = []
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            line = buf[start:nl]
            start = nl + 1
            if not line:
                if self._data or self._event:
                    events.append(SSEEvent("\n".join(self._data), self._event, self._id))
                self._data, self._event = [], ""
                continue
            self._field(line)
        self._buf = buf[start:]
        return events

    def _field(self, line: bytes) -> None:
        if line[:1] == b":":
            return  # comment / keep-alive
        name, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        text = value.decode("utf-8", "replace")
        if name == b"data":
            self._data.append(text)
        elif name == b"event":
            self._event = text
        elif name == b"id":
            self._id = text

    @property
    def pending(self) -> bool:
        """True when bytes of an unfinished event are buffered (a stream cut mid-event)."""
        return bool(self._buf.strip() or self._data)


def encode_event(data: bytes, event: str | None = None) -> bytes:
    """One SSE event carrying `data` (which must not contain newlines, e.g. compact JSON)."""
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + data + b"\n\n"


DONE = b"data: [DONE]\n\n"
