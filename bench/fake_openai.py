"""A deliberately cheap fake OpenAI upstream for the benchmark: raw asyncio HTTP/1.1 with
precomputed response bytes, so the load generator and the proxy under test, not this
server, set the pace. Run: ``python bench/fake_openai.py --port 9001``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Callable

try:
    import orjson

    _loads: Callable[[bytes], object] = orjson.loads
except ImportError:  # pragma: no cover - the venv has orjson
    _loads = json.loads

MODEL = "fake-model"
CREATED = 1_700_000_000
STREAM_CHUNKS = 64
USAGE = {"prompt_tokens": 9, "completion_tokens": STREAM_CHUNKS, "total_tokens": 9 + STREAM_CHUNKS}
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _completion_body() -> bytes:
    return _dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": CREATED,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello from the fake upstream."},
                    "finish_reason": "stop",
                }
            ],
            "usage": USAGE,
        }
    )


def _chunk_event(index: int) -> dict[str, object]:
    delta = {"role": "assistant"} if index == 0 else {}
    delta["content"] = f"tok{index} "
    last = index == STREAM_CHUNKS - 1
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": "stop" if last else None}],
    }


def _http_chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _stream_pieces() -> list[bytes]:
    """Each SSE event framed as its own HTTP chunk, ready to write."""
    events = [_dumps(_chunk_event(i)) for i in range(STREAM_CHUNKS)]
    usage = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": CREATED,
             "model": MODEL, "choices": [], "usage": USAGE}
    events.append(_dumps(usage))
    pieces = [_http_chunk(b"data: " + e + b"\n\n") for e in events]
    pieces.append(_http_chunk(b"data: [DONE]\n\n"))
    pieces[-1] += b"0\r\n\r\n"
    return pieces


def _response(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    head = b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
    return head % (status.encode(), content_type, len(body)) + body


COMPLETION = _response("200 OK", _completion_body())
MODELS = _response("200 OK", _dumps({"object": "list", "data": [
    {"id": MODEL, "object": "model", "created": CREATED, "owned_by": "bench"}]}))
NOT_FOUND = _response("404 Not Found", b'{"error":{"message":"not found","type":"invalid_request_error"}}')
BAD_REQUEST = _response("400 Bad Request", b'{"error":{"message":"bad request","type":"invalid_request_error"}}')
STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
               b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")
STREAM_PIECES = _stream_pieces()


class Request:
    __slots__ = ("method", "path", "body", "close")

    def __init__(self, method: bytes, path: bytes, body: bytes, close: bool) -> None:
        self.method, self.path, self.body, self.close = method, path, body, close


class ParseError(Exception):
    pass


def _dechunk(buf: bytearray, start: int) -> tuple[bytes, int] | None:
    """Decode a chunked body starting at `start`; None while incomplete."""
    body = bytearray()
    pos = start
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n\r\n", pos - 2)  # no trailers expected: "0\r\n\r\n"
            return (bytes(body), end + 4) if end >= 0 else None
        if len(buf) < pos + size + 2:
            return None
        body += buf[pos : pos + size]
        pos += size + 2
        if len(body) > MAX_BODY_BYTES:
            raise ParseError("body too large")


def parse_request(buf: bytearray) -> tuple[Request, int] | None:
    """One request from the front of `buf` and the bytes it used; None while incomplete."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        if len(buf) > MAX_HEADER_BYTES:
            raise ParseError("headers too large")
        return None
    lines = bytes(buf[:head_end]).split(b"\r\n")
    try:
        method, path, version = lines[0].split(b" ", 2)
    except ValueError:
        raise ParseError("bad request line") from None
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    close = headers.get(b"connection", b"").lower() == b"close" or version == b"HTTP/1.0"
    start = head_end + 4
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        done = _dechunk(buf, start)
        if done is None:
            return None
        return Request(method, path, done[0], close), done[1]
    length = int(headers.get(b"content-length", b"0"))
    if length > MAX_BODY_BYTES:
        raise ParseError("body too large")
    if len(buf) < start + length:
        return None
    return Request(method, path, bytes(buf[start : start + length]), close), start + length


def wants_stream(body: bytes) -> bool | None:
    """The request's `stream` flag, or None if the body is not a JSON object."""
    try:
        data = _loads(body)
    except ValueError:
        return None
    return bool(data.get("stream")) if isinstance(data, dict) else None


class FakeOpenAI(asyncio.Protocol):
    """Serves requests in order on one keep-alive connection; a stream holds the next one back.

    `first_gap_s` is a pause after the first SSE event (like a model's first token), so the
    first event travels alone and time-to-first-byte is not mixed up with the rest of the stream.
    """

    first_gap_s = 0.0

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.streaming = False
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.streaming:
            self.process()

    def process(self) -> None:
        while self.transport is not None and not self.streaming:
            try:
                parsed = parse_request(self.buf)
            except (ParseError, ValueError):
                self.transport.write(BAD_REQUEST)
                self.transport.close()
                return
            if parsed is None:
                return
            request, used = parsed
            del self.buf[:used]
            self.respond(request)

    def respond(self, request: Request) -> None:
        assert self.transport is not None
        path = request.path.split(b"?", 1)[0]
        if request.method == b"POST" and path == b"/v1/chat/completions":
            stream = wants_stream(request.body)
            if stream is None:
                self.transport.write(BAD_REQUEST)
            elif stream:
                self.streaming = True
                self.transport.write(STREAM_HEAD)
                self.loop.call_soon(self.write_piece, 0, request.close)
                return
            else:
                self.transport.write(COMPLETION)
        elif request.method == b"GET" and path in (b"/v1/models", b"/health"):
            self.transport.write(MODELS)
        else:
            self.transport.write(NOT_FOUND)
        if request.close:
            self.transport.close()

    def write_piece(self, index: int, close: bool) -> None:
        """One SSE event per loop iteration, so each is its own send (flushed as it goes)."""
        if self.transport is None:
            return
        self.transport.write(STREAM_PIECES[index])
        if index + 1 < len(STREAM_PIECES):
            if index == 0 and self.first_gap_s > 0:
                self.loop.call_later(self.first_gap_s, self.write_piece, 1, close)
            else:
                self.loop.call_soon(self.write_piece, index + 1, close)
            return
        self.streaming = False
        if close:
            self.transport.close()
        else:
            self.process()


def install_fast_loop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FakeOpenAI, host, port, backlog=1024, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", choices=("auto", "asyncio"), default="auto")
    parser.add_argument("--first-gap-ms", type=float, default=0.0,
                        help="pause after a stream's first event (default 0: no pause at all)")
    args = parser.parse_args(argv)
    FakeOpenAI.first_gap_s = max(0.0, args.first_gap_ms) / 1000
    loop_name = install_fast_loop() if args.loop == "auto" else "asyncio"
    print(f"fake_openai listening on {args.host}:{args.port} ({loop_name})", file=sys.stderr, flush=True)
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
