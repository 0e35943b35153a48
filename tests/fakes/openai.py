"""A strict fake of an OpenAI-compatible chat upstream, served on loopback in tests.

It checks the key and the body like the real API, answers from the conversation it was
sent (so a test can prove what reached it), and can be told to hold, fail, stall or cut.
"""

from __future__ import annotations

import asyncio
import base64
import struct
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


def _err(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


@dataclass
class Seen:
    headers: dict[str, str]
    body: dict[str, Any]
    raw: bytes


@dataclass
class OpenAIFake:
    """`app` is the aiohttp app. Script behaviour by setting the attributes before a request."""

    key: str = "sk-upstream-test"
    seen: list[Seen] = field(default_factory=list)
    # Stream control: after the first chunk, wait for this event before sending the rest.
    hold_after_first: asyncio.Event | None = None
    # How many chunks go out before `hold_after_first` holds (1: just the role chunk).
    hold_after: int = 1
    # Wait for this event before sending the response head (a stalled upstream).
    stall_head: asyncio.Event | None = None
    # Close the connection after this many chunks, without [DONE].
    cut_after: int | None = None
    # End the stream cleanly after the content: no finish reason, no [DONE] (truncated).
    end_without_finish: bool = False
    # After [DONE], wait for this event before ending the body (an upstream that lingers).
    linger_after_done: asyncio.Event | None = None
    # Answer the next request with this (status, body) instead.
    fail_next: tuple[int, bytes] | None = None
    # Headers on every answer (and on `fail_next`'s): rate limits, request ids, Retry-After.
    reply_headers: dict[str, str] = field(default_factory=dict)
    # When each accepted request arrived (loop time), to observe the pacing of retries.
    seen_at: list[float] = field(default_factory=list)
    # Answer the next request with this status and an error body that echoes every request
    # header it received, Authorization included (a careless upstream's debug output).
    echo_headers_next: int | None = None
    # Non-stream answers: send the head and the first half of the body, then wait for this.
    stall_body: asyncio.Event | None = None
    # Set when a request passed the checks and was recorded in `seen`.
    received: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when a client closed the connection while the fake was still answering.
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    chunks_sent: int = 0
    # What `GET /v1/models` lists; `models_down` makes it answer 503.
    models: list[str] = field(default_factory=lambda: ["gpt-4o", "gpt-4o-mini", "llama3.2", "llama3.1:8b", "text-embedding-3-small"])
    models_down: bool = False
    models_asked: int = 0

    def __post_init__(self) -> None:
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_get("/v1/models", self.list_models)
        self.app.router.add_post("/v1/responses", self.responses)
        self.app.router.add_post("/v1/embeddings", self.embeddings)
        self.app.router.add_post("/v1/completions", self.completions)

    async def list_models(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.key}":
            return _err(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        self.models_asked += 1
        if self.models_down:
            return _err(503, "The server is overloaded.", "server_error")
        data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "system"} for m in self.models]
        return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")

    @staticmethod
    def reply_for(messages: list[dict[str, Any]]) -> str:
        """What the fake answers: proves how many messages it saw and the last one."""
        last = messages[-1].get("content")
        return f"upstream saw {len(messages)} messages; last: {last}"

    async def _read(self, request: web.Request) -> tuple[Any, bytes] | web.Response:
        """The request's JSON body and bytes, if its key, type and JSON pass as the real
        API checks them; else the error response to send."""
        raw = await request.read()
        if request.headers.get("Authorization") != f"Bearer {self.key}":
            return _err(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        if request.content_type != "application/json":
            return _err(400, "Content-Type must be application/json")
        try:
            return orjson.loads(raw), raw
        except orjson.JSONDecodeError:
            return _err(400, "We could not parse the JSON body of your request.")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        read = await self._read(request)
        if isinstance(read, web.Response):
            return read
        body, raw = read
        model, messages = body.get("model"), body.get("messages")
        if not isinstance(model, str) or not isinstance(messages, list) or not messages:
            return _err(400, "model and messages are required")
        problem = _tool_problem(messages)
        if problem:
            return _err(400, problem)
        self.seen.append(Seen(dict(request.headers), body, raw))
        self.seen_at.append(asyncio.get_running_loop().time())
        self.received.set()
        try:
            return await self._answer(request, body, model, messages)
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnected.set()
            raise

    async def _answer(
        self, request: web.Request, body: dict[str, Any], model: str, messages: list[dict[str, Any]]
    ) -> web.StreamResponse:
        if self.stall_head is not None:
            await self.stall_head.wait()
        scripted = self._scripted(request)
        if scripted is not None:
            return scripted
        text = self.reply_for(messages)
        words = text.split(" ")
        usage = {"prompt_tokens": 3 * len(messages), "completion_tokens": len(words), "total_tokens": 3 * len(messages) + len(words)}
        cid = f"chatcmpl-fake{len(self.seen)}"
        n = body.get("n") or 1
        call = _tool_call(body, messages, cid)
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if call is not None:
                message = {"role": "assistant", "content": None, "tool_calls": [call]}
            out = {
                "id": cid,
                "object": "chat.completion",
                "created": 1700000000,
                "model": model,
                "choices": [
                    {"index": i, "message": message if i == 0 else {"role": "assistant", "content": f"{text} (choice {i})"},
                     "finish_reason": "tool_calls" if call is not None and i == 0 else "stop"}
                    for i in range(n)
                ],
                "usage": usage,
            }  # fmt: skip
            data = orjson.dumps(out)
            if self.stall_body is None:
                return web.Response(body=data, content_type="application/json", headers=self.reply_headers)
            resp = web.StreamResponse(headers={**self.reply_headers, "Content-Type": "application/json", "Content-Length": str(len(data))})
            await resp.prepare(request)
            await resp.write(data[: len(data) // 2])
            await self.stall_body.wait()
            await resp.write(data[len(data) // 2 :])
            await resp.write_eof()
            return resp
        # As api.openai.com sends it (a charset the proxy must not add a second Content-Type beside).
        resp = web.StreamResponse(headers={**self.reply_headers, "Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        head = {"id": cid, "object": "chat.completion.chunk", "created": 1700000000, "model": model}
        pieces = [{"role": "assistant", "content": ""}] + [{"content": w if i == 0 else " " + w} for i, w in enumerate(words)]
        if call is not None:  # a tool call in pieces, as the API streams them
            args = call["function"]["arguments"]
            pieces = [
                {"role": "assistant", "content": None, "tool_calls": [{"index": 0, "id": call["id"], "type": "function", "function": {"name": call["function"]["name"], "arguments": ""}}]},
                {"tool_calls": [{"index": 0, "function": {"arguments": args[: len(args) // 2]}}]},
                {"tool_calls": [{"index": 0, "function": {"arguments": args[len(args) // 2 :]}}]},
            ]  # fmt: skip
        for i, delta in enumerate(pieces):
            if self.cut_after is not None and i >= self.cut_after:
                request.transport.close()  # type: ignore[union-attr]
                return resp
            for c in range(n):
                d = delta if c == 0 else {"content": f"{delta.get('content') or ''}" + (f" (choice {c})" if i == len(pieces) - 1 else "")}
                chunk = {**head, "choices": [{"index": c, "delta": d, "finish_reason": None}]}
                await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            self.chunks_sent += 1
            if i == self.hold_after - 1 and self.hold_after_first is not None:
                await self.hold_after_first.wait()
        if self.end_without_finish:
            await resp.write_eof()
            return resp
        for c in range(n):
            reason = "tool_calls" if call is not None and c == 0 else "stop"
            final = {**head, "choices": [{"index": c, "delta": {}, "finish_reason": reason}]}
            await resp.write(b"data: " + orjson.dumps(final) + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(b"data: " + orjson.dumps({**head, "choices": [], "usage": usage}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        if self.linger_after_done is not None:
            await self.linger_after_done.wait()
        await resp.write_eof()
        return resp

    # -- the other endpoints: checked as strictly, answered from what they were sent -------
    async def _accept(self, request: web.Request, required: str) -> dict[str, Any] | web.Response:
        """The body, if it passes the checks the real API makes (key, JSON, `model` and
        `required`), recorded; else the error response to send."""
        read = await self._read(request)
        if isinstance(read, web.Response):
            return read
        body, raw = read
        if not isinstance(body, dict) or not isinstance(body.get("model"), str) or body.get(required) in (None, "", []):
            return _err(400, f"Missing required parameter: '{required if isinstance(body, dict) and 'model' in body else 'model'}'.")
        self.seen.append(Seen(dict(request.headers), body, raw))
        self.seen_at.append(asyncio.get_running_loop().time())
        self.received.set()
        scripted = self._scripted(request)
        return body if scripted is None else scripted

    def _scripted(self, request: web.Request) -> web.Response | None:
        """The failure a test scripted for the next request, if any (taken once)."""
        if self.fail_next is not None:
            status, data = self.fail_next
            self.fail_next = None
            return web.Response(status=status, body=data, content_type="application/json", headers=self.reply_headers)
        if self.echo_headers_next is not None:
            status, self.echo_headers_next = self.echo_headers_next, None
            return _err(status, f"request rejected; headers were {dict(request.headers)}", "upstream_debug")
        return None

    async def _sse(self, request: web.Request, events: list[tuple[str | None, dict[str, Any]]], done: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={**self.reply_headers, "Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        for name, data in events:
            head = f"event: {name}\n".encode() if name else b""
            await resp.write(head + b"data: " + orjson.dumps(data) + b"\n\n")
            self.chunks_sent += 1
        if done:
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    @staticmethod
    def text_for(prompt: Any) -> str:
        """What the fake answers a Responses `input` or a completions `prompt`."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
            prompt = prompt[-1].get("content")
        elif isinstance(prompt, list) and prompt:
            prompt = prompt[-1]
        return f"upstream answered: {prompt}"

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body = await self._accept(request, "input")
        if isinstance(body, web.Response):
            return body
        n = len(self.seen)
        text = self.text_for(body["input"])
        words = text.split(" ")
        usage = {"input_tokens": 3, "output_tokens": len(words), "total_tokens": 3 + len(words),
                 "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}
        message = {"type": "message", "id": f"msg_fake{n}", "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": text, "annotations": []}]}
        done = {"id": f"resp_fake{n}", "object": "response", "created_at": 1700000000, "status": "completed",
                "model": body["model"], "output": [message], "usage": usage, "error": None, "incomplete_details": None,
                "instructions": body.get("instructions"), "metadata": {}, "parallel_tool_calls": True,
                "tool_choice": "auto", "tools": [], "temperature": 1.0, "top_p": 1.0}
        if not body.get("stream"):
            return web.Response(body=orjson.dumps(done), content_type="application/json", headers=self.reply_headers)
        started = {**done, "status": "in_progress", "output": [], "usage": None}
        events: list[tuple[str | None, dict[str, Any]]] = [("response.created", {"type": "response.created", "sequence_number": 0, "response": started})]
        for i, w in enumerate(words):
            delta = {"type": "response.output_text.delta", "sequence_number": i + 1, "item_id": message["id"],
                     "output_index": 0, "content_index": 0, "delta": w if i == 0 else " " + w, "logprobs": []}
            events.append(("response.output_text.delta", delta))
        events.append(("response.completed", {"type": "response.completed", "sequence_number": len(words) + 1, "response": done}))
        return await self._sse(request, events, done=False)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await self._accept(request, "input")
        if isinstance(body, web.Response):
            return body
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            return _err(400, f"Invalid value for 'encoding_format': {fmt!r}.")
        data = []
        for i, item in enumerate(inputs):
            vector = [float(len(str(item))), float(i), 0.5, -0.25]
            encoded: Any = vector if fmt == "float" else base64.b64encode(struct.pack("<4f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        out = {"object": "list", "data": data, "model": body["model"], "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}}
        return web.Response(body=orjson.dumps(out), content_type="application/json", headers=self.reply_headers)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._accept(request, "prompt")
        if isinstance(body, web.Response):
            return body
        text = self.text_for(body["prompt"])
        words = text.split(" ")
        usage = {"prompt_tokens": 3, "completion_tokens": len(words), "total_tokens": 3 + len(words)}
        head = {"id": f"cmpl-fake{len(self.seen)}", "object": "text_completion", "created": 1700000000, "model": body["model"]}
        if not body.get("stream"):
            out = {**head, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}], "usage": usage}
            return web.Response(body=orjson.dumps(out), content_type="application/json", headers=self.reply_headers)
        events: list[tuple[str | None, dict[str, Any]]] = [
            (None, {**head, "choices": [{"text": w if i == 0 else " " + w, "index": 0, "logprobs": None, "finish_reason": None}]})
            for i, w in enumerate(words)
        ]
        events.append((None, {**head, "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}]}))
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append((None, {**head, "choices": [], "usage": usage}))
        return await self._sse(request, events, done=True)


def _tool_call(body: dict[str, Any], messages: list[dict[str, Any]], cid: str) -> dict[str, Any] | None:
    """With tools offered and a last user message starting `call `, the fake calls the first
    tool with that message as its argument; after a tool result it answers in text."""
    tools = body.get("tools")
    last = messages[-1]
    if not tools or last.get("role") != "user" or not str(last.get("content") or "").startswith("call "):
        return None
    name = tools[0]["function"]["name"]
    return {"id": f"call_{cid[-6:]}", "type": "function", "function": {"name": name, "arguments": orjson.dumps({"q": last["content"]}).decode()}}


def _tool_problem(messages: list[dict[str, Any]]) -> str | None:
    """As the API: an assistant message with tool calls must be answered by a tool message
    for each call id, right after it."""
    for i, m in enumerate(messages):
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        if m.get("role") == "assistant" and calls:
            ids = {c.get("id") for c in calls}
            answered = {t.get("tool_call_id") for t in messages[i + 1 : i + 1 + len(ids)] if t.get("role") == "tool"}
            if answered != ids:
                return "An assistant message with 'tool_calls' must be followed by tool messages responding to each 'tool_call_id'."
    return None
