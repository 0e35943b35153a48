"""A strict in-process fake of the Qwen chat web API v2 (see protocols/qwen-chat-v2.md).

Owns the fake's chat trees, its request validation and its byte-split SSE answers, plus the
scripting hooks tests use to make the next completion fail, truncate or stall. Like the real
service, a chat is in progress until its reply stream has closed, not only until `finished`
(`linger` keeps a finished stream open a while).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

ERROR_CODES = ("Bad_Request", "NotFound", "RateLimited", "Unauthorized")
_DEFAULT_DETAILS = {
    "Bad_Request": "Bad request",
    "NotFound": "Chat not found",
    "RateLimited": "You have reached the usage limit, please try again later",
    "Unauthorized": "Unauthorized, please log in again",
}
_WORD = re.compile(r"\S+\s*")
# How often the stall waiter looks at the socket: aiohttp (handler_cancellation off, the
# default) tells a handler nothing when its client goes away, so the fake has to look.
_DISCONNECT_POLL = 0.01


@dataclass
class Turn:
    """One completion request the fake accepted."""

    chat_id: str
    parent_id: str | None
    user_content: str
    context: list[tuple[str, str]]
    response_id: str
    reply: str
    completed: bool
    request_bytes: int
    user_id: str = ""  # id of the new user message (the request's `fid`)
    sent: str = ""  # answer text actually written before the stream ended
    usage: dict[str, int] = field(default_factory=dict)  # last cumulative usage written


@dataclass
class Message:
    """A node of a chat's tree; an assistant reply is a valid parent only once `done`."""

    id: str
    role: str
    content: str
    parent_id: str | None
    children: list[str] = field(default_factory=list)
    done: bool = True


@dataclass
class Chat:
    """One chat upstream: its message tree and the reply it is generating, if any."""

    id: str
    title: str
    models: list[str]
    chat_type: str
    messages: dict[str, Message] = field(default_factory=dict)
    generating: str | None = None  # response_id of the turn still streaming
    busy_until: float = 0.0  # (loop time) a finished turn whose client left still runs till then

    def busy(self) -> bool:
        return self.generating is not None or asyncio.get_running_loop().time() < self.busy_until

    def path(self, msg_id: str) -> list[tuple[str, str]]:
        """(role, content) from the root down to `msg_id`, inclusive."""
        out: list[tuple[str, str]] = []
        node: str | None = msg_id
        while node is not None:
            msg = self.messages[node]
            out.append((msg.role, msg.content))
            node = msg.parent_id
        return out[::-1]


@dataclass
class _Script:
    kind: str  # "fail" | "http" | "truncate" | "stall"
    code: str = ""
    details: str = ""
    num: int | None = None
    status: int = 200
    body: bytes = b""
    content_type: str = ""
    after_events: int = 0
    abort: bool = False
    release: asyncio.Event | None = None
    echo_auth: bool = False  # append the Authorization header received to the details


class _Rejected(Exception):
    def __init__(self, code: str, details: str, num: int | None = None) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.num = num


class QwenFake:
    """The fake upstream: `app` serves the v2 endpoints; the attributes record what happened.

    `fake = QwenFake("tok", seed=1, chunk_words=2)`; `fake.stall_next()` before a request
    returns the Event that lets that stream finish. `linger`: seconds a stream stays open
    after its `finished` event, the chat still in progress.
    """

    def __init__(
        self,
        token: str = "test-token",
        *,
        seed: int = 0,
        chunk_words: int = 1,
        max_piece: int = 24,
        linger: float = 0.0,
    ) -> None:
        if chunk_words < 1 or max_piece < 1:
            raise ValueError("chunk_words and max_piece must be >= 1")
        self.token = token
        self.chunk_words = chunk_words
        self.max_piece = max_piece
        self.linger = linger
        self.turns: list[Turn] = []
        self.chats: dict[str, Chat] = {}
        self.created_chats = 0
        self.refused_busy = 0  # turns refused because their chat was in progress
        self.not_found: list[str] = []  # chat ids of turns refused with NotFound
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []  # request headers, every endpoint, in order
        self.disconnected = asyncio.Event()
        self._rng = random.Random(seed)
        self._scripts: deque[_Script] = deque()
        self._new_chat_stalls: deque[asyncio.Event] = deque()
        self.app = web.Application()
        self.app.router.add_post("/api/v2/chats/new", self._new_chat)
        self.app.router.add_post("/api/v2/chat/completions", self._completions)
        self.app.router.add_get("/api/v2/chats/{chat_id}", self._get_chat)
        self.app.router.add_delete("/api/v2/chats/{chat_id}", self._delete_chat)

    # -- scripting -------------------------------------------------------------------------

    def fail_next(self, code: str, *, details: str = "", num: int | None = None, echo_auth: bool = False) -> None:
        """The next completion request gets `{"success": false, "data": {"code": code}}`;
        `echo_auth=True` appends the Authorization header it received to the details."""
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}; one of {ERROR_CODES}")
        if code == "RateLimited" and num is None:
            num = 1  # the real service always says how many hours to wait
        details = details or _DEFAULT_DETAILS[code]
        self._scripts.append(_Script("fail", code=code, details=details, num=num, echo_auth=echo_auth))

    def error_mid_stream_next(self, code: str, *, details: str = "", echo_auth: bool = False) -> None:
        """The next accepted stream sends response.created and one delta, then the error
        body `{"success": false, "data": {...}}` as an event, and ends."""
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}; one of {ERROR_CODES}")
        details = details or _DEFAULT_DETAILS[code]
        self._scripts.append(_Script("error_mid_stream", code=code, details=details, echo_auth=echo_auth))

    def http_error_next(
        self, status: int, body: str | bytes, content_type: str = "application/json"
    ) -> None:
        """The next completion request gets a plain HTTP `status` with this body."""
        raw = body.encode() if isinstance(body, str) else body
        self._scripts.append(_Script("http", status=status, body=raw, content_type=content_type))

    def truncate_next(self, after_events: int = 2, *, abort: bool = False) -> None:
        """The next accepted stream ends after `after_events` events (response.created
        included) without 'finished'; `abort=True` drops the connection instead of ending
        the body cleanly."""
        if after_events < 1:
            raise ValueError("after_events must be >= 1")
        self._scripts.append(_Script("truncate", after_events=after_events, abort=abort))

    def stall_next(self) -> asyncio.Event:
        """The next accepted stream sends response.created and one delta, then waits for
        the returned Event (or a client disconnect); the chat is in progress meanwhile."""
        release = asyncio.Event()
        self._scripts.append(_Script("stall", release=release))
        return release

    def stall_new_chat_next(self) -> asyncio.Event:
        """The next chat creation answers only once the returned Event is set."""
        release = asyncio.Event()
        self._new_chat_stalls.append(release)
        return release

    def forget(self, chat_id: str) -> None:
        """Expire a chat upstream: every later request naming it gets NotFound."""
        del self.chats[chat_id]

    @staticmethod
    def reply_for(context: list[tuple[str, str]]) -> str:
        """The reply to a path; it digests every role and content, so it proves the context."""
        digest = hashlib.sha256(json.dumps(context).encode()).hexdigest()[:16]
        depth = sum(1 for role, _ in context if role == "user")
        # Non-ASCII of 2, 3 and 4 UTF-8 bytes, so byte splitting lands inside characters.
        return f"reply {depth}: {digest} ok ✓ café 🙂"

    @staticmethod
    def thinking_for(context: list[tuple[str, str]]) -> str:
        """The reasoning text streamed in the think phase when thinking is enabled."""
        depth = sum(1 for role, _ in context if role == "user")
        return f"thinking about turn {depth} of this path …"

    # -- handlers --------------------------------------------------------------------------

    async def _new_chat(self, request: web.Request) -> web.Response:
        self.headers.append(dict(request.headers))
        try:
            self._check_auth(request)
            body = await self._json_body(request)
            models = body.get("models")
            if not isinstance(models, list) or not models or not all(
                isinstance(m, str) and m for m in models
            ):
                raise _Rejected("Bad_Request", "models must be a non-empty list of strings")
            if not isinstance(body.get("chat_type"), str):
                raise _Rejected("Bad_Request", "chat_type must be a string")
        except _Rejected as exc:
            return _error(exc.code, exc.details)
        if self._new_chat_stalls:
            await self._new_chat_stalls.popleft().wait()
        chat = Chat(
            id=str(uuid.uuid4()),
            title=str(body.get("title", "New Chat")),
            models=models,
            chat_type=body["chat_type"],
        )
        self.chats[chat.id] = chat
        self.created_chats += 1
        return _ok({"id": chat.id})

    async def _get_chat(self, request: web.Request) -> web.Response:
        try:
            self._check_auth(request)
            chat = self._chat(request.match_info["chat_id"])
        except _Rejected as exc:
            return _error(exc.code, exc.details)
        messages = [
            {
                "id": m.id,
                "role": m.role,
                "content": m.content,
                "parentId": m.parent_id,
                "childrenIds": list(m.children),
                "status": "finished" if m.done else "unfinished",
            }
            for m in chat.messages.values()
        ]
        data = {
            "id": chat.id,
            "title": chat.title,
            "models": chat.models,
            "chat_type": chat.chat_type,
            "messages": messages,
        }
        return _ok(data)

    async def _delete_chat(self, request: web.Request) -> web.Response:
        try:
            self._check_auth(request)
            chat = self._chat(request.match_info["chat_id"])
        except _Rejected as exc:
            return _error(exc.code, exc.details)
        del self.chats[chat.id]
        return _ok({"status": True})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.headers.append(dict(request.headers))
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            self.requests.append(parsed)
        script = self._scripts.popleft() if self._scripts else None
        try:
            self._check_auth(request)
            if request.content_type != "application/json":
                raise _Rejected("Bad_Request", "Content-Type must be application/json")
            if not isinstance(parsed, dict):
                raise _Rejected("Bad_Request", "body must be a JSON object")
            msg = _validate_completion(request.query.get("chat_id"), parsed)
            if script is not None and script.kind == "fail":
                raise _Rejected(script.code, _details(script, request), script.num)
            if script is not None and script.kind == "http":
                return web.Response(
                    status=script.status,
                    body=script.body,
                    headers={"Content-Type": script.content_type},
                )
            chat = self._chat(parsed["chat_id"], turn=True)
            if chat.busy():
                self.refused_busy += 1
                raise _Rejected("Bad_Request", "The chat is in progress!")
            parent_id = parsed["parent_id"]
            if parent_id is not None:
                parent = chat.messages.get(parent_id)
                if parent is None or parent.role != "assistant" or not parent.done:
                    raise _Rejected(
                        "Bad_Request", f"Invalid input chat parent_id {parent_id} is not exist"
                    )
            if msg["fid"] in chat.messages:
                raise _Rejected("Bad_Request", f"fid {msg['fid']} already exists in this chat")
        except _Rejected as exc:
            return _error(exc.code, exc.details, num=exc.num)

        thinking = msg["feature_config"].get("thinking_enabled") is True
        turn = self._accept(chat, parent_id, msg, len(raw))
        return await self._stream(request, chat, turn, thinking, script)

    # -- internals -------------------------------------------------------------------------

    def _check_auth(self, request: web.Request) -> None:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            raise _Rejected("Unauthorized", "missing or invalid Authorization bearer token")

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        if request.content_type != "application/json":
            raise _Rejected("Bad_Request", "Content-Type must be application/json")
        try:
            body = json.loads(await request.read())
        except ValueError:
            raise _Rejected("Bad_Request", "body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _Rejected("Bad_Request", "body must be a JSON object")
        return body

    def _chat(self, chat_id: str, turn: bool = False) -> Chat:
        chat = self.chats.get(chat_id)
        if chat is None:
            if turn:
                self.not_found.append(chat_id)
            raise _Rejected("NotFound", f"chat {chat_id} not found")
        return chat

    def _accept(
        self, chat: Chat, parent_id: str | None, msg: dict[str, Any], size: int
    ) -> Turn:
        """Put the user message and the (not yet done) reply into the tree; record a Turn."""
        user = Message(msg["fid"], "user", msg["content"], parent_id)
        chat.messages[user.id] = user
        if parent_id is not None:
            chat.messages[parent_id].children.append(user.id)
        context = chat.path(user.id)
        reply = self.reply_for(context)
        answer = Message(str(uuid.uuid4()), "assistant", reply, user.id, done=False)
        chat.messages[answer.id] = answer
        user.children.append(answer.id)
        chat.generating = answer.id
        turn = Turn(
            chat_id=chat.id,
            parent_id=parent_id,
            user_content=user.content,
            context=context,
            response_id=answer.id,
            reply=reply,
            completed=False,
            request_bytes=size,
            user_id=user.id,
        )
        self.turns.append(turn)
        return turn

    def _events(self, turn: Turn, thinking: bool) -> list[tuple[bytes, str, dict[str, int]]]:
        """Every event of the turn as (encoded bytes, answer text it adds, usage after it)."""
        created = {
            "response.created": {
                "chat_id": turn.chat_id,
                "parent_id": turn.user_id,
                "response_id": turn.response_id,
            }
        }
        events = [(_sse(created), "", {})]
        inp = sum(len(content.split()) for _, content in turn.context)
        out = 0
        phases = [("answer", turn.reply)]
        if thinking:
            phases.insert(0, ("think", self.thinking_for(turn.context)))
        for phase, text in phases:
            words = _WORD.findall(text)
            for i in range(0, len(words), self.chunk_words):
                group = words[i : i + self.chunk_words]
                out += len(group)
                usage = {"input_tokens": inp, "output_tokens": out, "total_tokens": inp + out}
                delta = {"role": "assistant", "content": "".join(group), "phase": phase,
                         "status": "typing"}
                event = {"choices": [{"delta": delta}], "usage": usage}
                events.append((_sse(event), delta["content"] if phase == "answer" else "", usage))
        finished = {"role": "assistant", "content": "", "phase": "answer", "status": "finished"}
        events.append((_sse({"choices": [{"delta": finished}]}), "", {}))
        return events

    async def _stream(
        self,
        request: web.Request,
        chat: Chat,
        turn: Turn,
        thinking: bool,
        script: _Script | None,
    ) -> web.StreamResponse:
        events = self._events(turn, thinking)
        kind = script.kind if script is not None else None
        if kind == "truncate":
            assert script is not None
            events = events[: min(script.after_events, len(events) - 1)]
        if kind == "error_mid_stream":
            assert script is not None
            error = {"success": False, "request_id": str(uuid.uuid4()), "data": {"code": script.code, "details": _details(script, request)}}
            events = events[:2] + [(_sse(error), "", {})]
        pause_at = 2 if kind == "stall" else None
        resp = web.StreamResponse(headers={"Cache-Control": "no-cache"})
        resp.content_type = "text/event-stream"
        resp.charset = "utf-8"
        try:
            await resp.prepare(request)
            for index, (data, text, usage) in enumerate(events):
                if index == pause_at:
                    assert script is not None and script.release is not None
                    if not await _wait_released(script.release, request):
                        self._mark_disconnected(chat, turn)
                        return resp
                for piece in self._cut(data):
                    await resp.write(piece)
                    # Two loop turns let a client on the same loop take this piece before
                    # the next is written (socket read, then reader wake-up), so reads are
                    # as small and as arbitrary as the writes instead of coalescing.
                    await asyncio.sleep(0)
                    await asyncio.sleep(0)
                turn.sent += text
                turn.usage = usage or turn.usage
            if kind in ("truncate", "error_mid_stream"):
                assert script is not None
                if script.kind == "truncate" and script.abort and request.transport is not None:
                    request.transport.abort()
                    chat.generating = None
                    return resp
            else:
                turn.completed = True
                chat.messages[turn.response_id].done = True
                # The upstream's own time after `finished`, not a test's wait; it runs out
                # even if the client leaves meanwhile.
                chat.busy_until = asyncio.get_running_loop().time() + self.linger
                if self.linger:
                    await asyncio.sleep(self.linger)
            await resp.write_eof()
            chat.generating = None  # only now: the turn runs until its stream has closed
        except ConnectionResetError:  # aiohttp's ClientConnectionResetError included
            self._mark_disconnected(chat, turn)
        except asyncio.CancelledError:
            self._mark_disconnected(chat, turn)
            raise
        return resp

    def _mark_disconnected(self, chat: Chat, turn: Turn) -> None:
        """The client left: the turn ends, unfinished unless `finished` went out already."""
        chat.generating = None
        turn.completed = chat.messages[turn.response_id].done
        self.disconnected.set()

    def _cut(self, data: bytes) -> list[bytes]:
        """Split at arbitrary byte offsets: inside UTF-8 characters and `\\n\\n` alike."""
        pieces, i = [], 0
        while i < len(data):
            n = self._rng.randint(1, self.max_piece)
            pieces.append(data[i : i + n])
            i += n
        return pieces


def _validate_completion(query_chat_id: str | None, body: dict[str, Any]) -> dict[str, Any]:
    """Check a completion body against the protocol; return its one user message."""

    def bad(details: str) -> _Rejected:
        return _Rejected("Bad_Request", details)

    if not query_chat_id:
        raise bad("chat_id query parameter is required")
    if body.get("chat_id") != query_chat_id:
        raise bad("chat_id in the body must equal the chat_id query parameter")
    if body.get("stream") is not True:
        raise bad("stream must be true")
    if body.get("incremental_output") is not True:
        raise bad("incremental_output must be true")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise bad("model must be a non-empty string")
    if "parent_id" not in body:
        raise bad("parent_id is required (null for a root)")
    parent_id = body["parent_id"]
    if parent_id is not None and (not isinstance(parent_id, str) or not parent_id):
        raise bad("parent_id must be null or a message id")
    messages = body.get("messages")
    if not isinstance(messages, list) or len(messages) != 1:
        raise bad("messages must be a list of exactly one user message")
    msg = messages[0]
    if not isinstance(msg, dict) or msg.get("role") != "user":
        raise bad("messages[0].role must be user")
    if not isinstance(msg.get("content"), str):
        raise bad("messages[0].content must be a string")
    if not isinstance(msg.get("fid"), str) or not msg["fid"]:
        raise bad("messages[0].fid must be a non-empty string")
    for key in ("parentId", "parent_id"):
        if key not in msg or msg[key] != parent_id:
            raise bad(f"messages[0].{key} must equal parent_id")
    feature_config = msg.get("feature_config")
    if not isinstance(feature_config, dict):
        raise bad("messages[0].feature_config must be an object")
    if not isinstance(feature_config.get("thinking_enabled", False), bool):
        raise bad("messages[0].feature_config.thinking_enabled must be a boolean")
    return msg


async def _wait_released(release: asyncio.Event, request: web.Request) -> bool:
    """Wait for `release`; False if the client went away first."""
    waiter = asyncio.ensure_future(release.wait())
    try:
        while not waiter.done():
            transport = request.transport
            if transport is None or transport.is_closing():
                return False
            await asyncio.wait([waiter], timeout=_DISCONNECT_POLL)
    finally:
        waiter.cancel()
    return True


def _details(script: _Script, request: web.Request) -> str:
    if not script.echo_auth:
        return script.details
    return f"{script.details} (request had Authorization: {request.headers.get('Authorization')})"


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


def _ok(data: dict[str, Any]) -> web.Response:
    return web.json_response({"success": True, "request_id": str(uuid.uuid4()), "data": data})


def _error(code: str, details: str, *, num: int | None = None) -> web.Response:
    data: dict[str, Any] = {"code": code, "details": details}
    if num is not None:
        data["num"] = num
    return web.json_response(
        {"success": False, "request_id": str(uuid.uuid4()), "data": data}, status=200
    )
