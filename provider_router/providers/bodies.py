"""Upstream bodies as they arrive: gzip/deflate decoded in bounded pieces and only whole
(`Inflate`), and event streams watched for a line too long to buffer (`LineCap`).
"""

from __future__ import annotations

import re
import zlib
from typing import Iterator, Mapping

from ..errors import ApiError

# An event-stream line may end with any of these (the SSE grammar).
_EOL = re.compile(rb"\r\n|\r|\n")


class Inflate:
    """A gzip or deflate body, decoded as it arrives in pieces of bounded size, and only
    whole: corrupt, cut short or followed by more bytes, it is an `ApiError`."""

    PIECE = 256 * 1024

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._z = zlib.decompressobj(47 if encoding != "deflate" else 15)  # 47: a gzip or zlib header
        self._fed = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        z = self._z
        while True:
            try:
                out = z.decompress(data, self.PIECE)
            except zlib.error as e:
                raise ApiError(502, f"upstream body broke: bad {self.encoding} data ({e})", code="upstream_stream_error") from None
            self._fed = True
            if z.unused_data:  # a second gzip member, or garbage: not whole either way
                raise ApiError(502, f"upstream body broke: bytes after the end of its {self.encoding} data", code="upstream_stream_error")
            if out:
                yield out
            data = z.unconsumed_tail
            if not data and len(out) < self.PIECE:
                return

    def end(self) -> None:
        if self._fed and not self._z.eof:  # (an empty body needs no decoding)
            raise ApiError(502, f"upstream body broke: its {self.encoding} data was cut short", code="upstream_stream_error")


def decoder_for(headers: Mapping[str, str]) -> Inflate | None:
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("identity", ""):
        return None
    if encoding in ("gzip", "x-gzip", "deflate"):
        return Inflate(encoding)
    raise ApiError(502, f"upstream answered in an unsupported content-encoding {encoding[:40]!r}", code="upstream_bad_response")


class LineCap:
    """Watches a byte stream for a line longer than `cap` (SSE lines end with CRLF, LF or
    CR): `feed` raises `ApiError` once one is, however the stream is split. An endless line
    would otherwise be buffered whole by the relay's record and by every SSE parser after it."""

    __slots__ = ("cap", "run")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.run = 0  # bytes since the last line end

    def feed(self, data: bytes) -> None:
        run, cap = self.run, self.cap
        if run + len(data) <= cap:  # the common case: nothing in here can be too long
            last = max(data.rfind(b"\n"), data.rfind(b"\r"))
            self.run = run + len(data) if last < 0 else len(data) - last - 1
            return
        lines = _EOL.split(data)
        if run + len(lines[0]) > cap or any(len(line) > cap for line in lines[1:]):
            raise ApiError(502, f"upstream sent an event-stream line longer than {cap} bytes", code="upstream_line_too_long")
        self.run = len(lines[-1]) if len(lines) > 1 else run + len(data)
