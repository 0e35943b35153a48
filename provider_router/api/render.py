"""Rendering a translating provider's events (echo, qwen) as OpenAI's chat JSON: one
`chat.completion`, or `chat.completion.chunk` events as they arrive; the log keeps the reply
as a `chat.completion` either way (what came of it, if it was cut short).
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

import orjson
from aiohttp import web

from ..providers import ChatCall, Delta, Finish, Started, UpstreamReply, Usage
from ..sse import DONE, encode_event
from ..records import RequestRecord
from . import streams

# Awaited once the upstream's reply is complete, before the client gets its end.
BeforeEnd = Callable[[], Awaitable[None]]


class _Reply:
    """Accumulates a translated reply as its events arrive."""

    __slots__ = ("text", "reasoning", "usage", "finish", "reply_id", "chat_id", "chunks")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.usage: Usage | None = None
        self.finish: str | None = None
        self.reply_id: str | None = None
        self.chat_id: str | None = None
        self.chunks = 0

    def take(self, ev: object) -> None:
        if isinstance(ev, Delta):
            if ev.content:
                self.text.append(ev.content)
            if ev.reasoning:
                self.reasoning.append(ev.reasoning)
        elif isinstance(ev, Usage):
            self.usage = ev
        elif isinstance(ev, Finish):
            self.finish = ev.reason
        elif isinstance(ev, Started):
            self.reply_id = ev.reply_id or self.reply_id
            self.chat_id = ev.chat_id or self.chat_id

    def fill(self, rec: RequestRecord) -> None:
        rec.response_text = "".join(self.text)
        rec.finish_reason = self.finish
        rec.reply_id = self.reply_id or rec.reply_id
        rec.chat_id = self.chat_id or rec.chat_id
        if self.usage is not None:
            rec.prompt_tokens = self.usage.prompt_tokens
            rec.completion_tokens = self.usage.completion_tokens
            rec.total_tokens = self.usage.total_tokens


def _usage_json(u: Usage) -> dict[str, int]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens}


class _Shape:
    """What every object of one reply carries: its id, creation time and model."""

    def __init__(self, rec: RequestRecord, call: ChatCall) -> None:
        self.id = f"chatcmpl-{rec.id}"
        self.created = int(time.time())
        self.model = call.body.get("model", call.upstream_model)

    def completion(self, acc: _Reply, cut: bool = False) -> bytes:
        """The reply as a `chat.completion` (what a non-stream client gets, and what the log
        keeps of a stream); `cut`: it never finished, so no finish reason is made up."""
        message: dict[str, Any] = {"role": "assistant", "content": "".join(acc.text)}
        if acc.reasoning:
            message["reasoning_content"] = "".join(acc.reasoning)
        out: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": acc.finish or (None if cut else "stop")}],
        }
        if acc.usage is not None:
            out["usage"] = _usage_json(acc.usage)
        return orjson.dumps(out)

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        head = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}
        return encode_event(orjson.dumps({**head, "choices": choices, **extra}))


async def render(
    request: web.Request, rec: RequestRecord, reply: UpstreamReply, call: ChatCall, before_end: BeforeEnd | None = None
) -> web.StreamResponse:
    """The reply as OpenAI's chat JSON; `before_end` is awaited once the reply completed
    (a finish reason came), before the client gets its end."""
    assert reply.events is not None
    rec.reply_format = "chat"  # the log reads the reply from `response_body`
    if call.stream:
        return await _stream(request, rec, reply, call, before_end)
    acc, shape = _Reply(), _Shape(rec, call)
    try:
        async for ev in reply.events:
            acc.take(ev)
    finally:
        acc.fill(rec)
    rec.response_body = data = shape.completion(acc)
    if before_end is not None and acc.finish is not None:
        await before_end()
    rec.first_byte()
    return web.Response(body=data, content_type="application/json")


def _delta(ev: Delta, first: bool) -> dict[str, Any]:
    delta: dict[str, Any] = {"role": "assistant"} if first else {}
    if ev.content:
        delta["content"] = ev.content
    if ev.reasoning:
        delta["reasoning_content"] = ev.reasoning
    return delta


async def _stream(
    request: web.Request, rec: RequestRecord, reply: UpstreamReply, call: ChatCall, before_end: BeforeEnd | None
) -> web.StreamResponse:
    assert reply.events is not None
    acc, shape = _Reply(), _Shape(rec, call)
    include_usage = bool((call.body.get("stream_options") or {}).get("include_usage"))
    resp: web.StreamResponse | None = None
    try:
        async with streams.told_in_stream(request):
            async for ev in reply.events:
                acc.take(ev)
                if isinstance(ev, Delta):
                    choice = {"index": 0, "delta": _delta(ev, first=acc.chunks == 0), "finish_reason": None}
                elif isinstance(ev, Finish):
                    choice = {"index": 0, "delta": {}, "finish_reason": ev.reason}
                else:
                    continue
                if resp is None:
                    resp = await _start(request, rec)
                acc.chunks += 1
                await resp.write(shape.chunk([choice]))
            if resp is None:  # a reply with no content at all still gets a well-formed stream
                resp = await _start(request, rec)
            if include_usage and acc.usage is not None:
                await resp.write(shape.chunk([], usage=_usage_json(acc.usage)))
            acc.fill(rec)
            rec.response_body = shape.completion(acc)
            if before_end is not None and acc.finish is not None:
                await before_end()
            await resp.write(DONE)
            await resp.write_eof()
    finally:
        acc.fill(rec)
        rec.chunk_count = acc.chunks
        if rec.response_body is None:  # cut short: the log keeps what came
            rec.response_body = shape.completion(acc, cut=True)
    assert resp is not None  # told_in_stream lets nothing pass before the head went out
    return resp


async def _start(request: web.Request, rec: RequestRecord) -> web.StreamResponse:
    resp = await streams.start(request)
    rec.first_byte()
    return resp
