"""Conversation threading: where in its session's thread the client's history continues,
what a threaded upstream must be sent, and when the thread advances. Knows no wire format:
providers translate, this module decides. The API calls it: `place` a turn, `hold` its chat
while the API relays the reply, `record` the reply once it completed (`chat_gone` when the
upstream lost the chat meanwhile).

A session's thread is the conversation tree of the log (`history.node_key`): a threaded
upstream's turns are facts about reply nodes of that tree (the upstream's chat and reply
ids). Sessions themselves (which one a request belongs to, their life) are sessions.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any, AsyncContextManager, AsyncIterator

import structlog
from aiohttp import web

from .errors import ApiError
from .history import node_key, node_keys
from .records import RequestRecord
from .routing import Route
from .sessions import Sessions
from .store.sessions import Session, Turn

log = structlog.get_logger("provider_router.threads")


# -- per-chat serialisation -----------------------------------------------------------------
class ChatLocks:
    """One turn at a time per upstream chat (the upstream refuses overlap); waiters queue."""

    def __init__(self) -> None:
        self._locks: dict[str, list[Any]] = {}  # chat_id -> [Lock, users]

    @contextlib.asynccontextmanager
    async def hold(self, chat_id: str, wait: float) -> AsyncIterator[None]:
        entry = self._locks.setdefault(chat_id, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            try:
                async with asyncio.timeout(wait):
                    await entry[0].acquire()
            except TimeoutError:
                raise ApiError(
                    429, f"This conversation is busy with another request (waited {wait:g}s).", code="conversation_busy"
                ) from None
            try:
                yield
            finally:
                entry[0].release()
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[chat_id]

    def waiting(self, chat_id: str) -> int:
        """How many turns hold the chat or wait for it."""
        entry = self._locks.get(chat_id)
        return 0 if entry is None else int(entry[1])


@dataclass(slots=True)
class Placement:
    """Where a turn continues in its session's thread, and what its upstream must be sent:
    the messages after the reply it continues (`parent_id` in `chat_id`), or the whole
    history in a new chat (`chat_id` None)."""

    session: Session
    chat_id: str | None
    parent_id: str | None
    messages: list[dict[str, Any]]  # to send
    history: list[dict[str, Any]]  # as the client sent it
    keys: list[bytes]  # `history`'s node keys


def _place(messages: list[dict[str, Any]], keys: list[bytes], turns: dict[bytes, Turn]) -> tuple[int, Turn | None]:
    """The longest prefix of the history that ends at a recorded reply: (its length, the turn)."""
    for k in range(len(messages) - 1, 0, -1):
        if messages[k - 1].get("role") == "assistant":
            t = turns.get(keys[k - 1])
            if t is not None:
                return k, t
    return 0, None


# -- the thread logic ------------------------------------------------------------------------
class Threads:
    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions
        self.locks = ChatLocks()

    async def place(self, request: web.Request, rec: RequestRecord, route: Route, messages: list[dict[str, Any]]) -> Placement:
        """A turn on a threaded upstream: join its session and find where the history
        continues, so that only what the upstream has not seen is sent."""
        s = await self.sessions.join(request, rec, route, messages)
        keys = node_keys(messages)  # each message keyed once per request
        rec.turn = sum(m.get("role") == "assistant" for m in messages) + 1
        k, node = _place(messages, keys, await self.sessions.turns(s))
        if node is None:  # never seen: a new chat with the whole history
            return Placement(s, None, None, messages, messages, keys)
        return Placement(s, node.chat_id, node.reply_id, messages[k:], messages, keys)

    def hold(self, p: Placement) -> AsyncContextManager[None]:
        """Held while the turn is upstream: a turn continuing a chat waits for the chat's
        turn in flight (429 after `lock_wait_seconds`); a new chat waits for nothing."""
        if p.chat_id is None:
            return contextlib.nullcontext()
        return self.locks.hold(p.chat_id, self.sessions.cfg.lock_wait_seconds)

    def chat_gone(self, p: Placement, reason: str) -> Placement:
        """The upstream no longer knows the chat the turn continued: forget its turns and
        place the turn again, in a new chat carrying the whole history. A new chat lost
        at once is the upstream's failure (502)."""
        if p.chat_id is None:
            raise ApiError(502, f"upstream lost the chat: {reason}", code="upstream_error")
        log.info("chat_gone", session=p.session.id, chat_id=p.chat_id)
        self.sessions.forget_chat(p.session, p.chat_id)
        return Placement(p.session, None, None, p.history, p.history, p.keys)

    async def record(self, p: Placement, rec: RequestRecord) -> None:
        """The turn's reply completed (`rec` holds it, with the upstream's chat and reply
        ids): the thread advances to it, so the next request continues from there. Awaited
        before the client gets the end of the reply: the turn is committed by then (or, if
        the database is held elsewhere, queued to land later)."""
        s = p.session
        if s.state == "deleted" or not p.keys:
            return
        h = node_key(p.keys[-1], {"role": "assistant", "content": rec.response_text or ""})
        t = Turn(message_hash=h, turn=rec.turn or 1, chat_id=rec.chat_id, reply_id=rec.reply_id)
        s.chat_id, s.parent_id = rec.chat_id, rec.reply_id
        s.message_count = len(p.history) + 1
        repo = self.sessions.repo
        repo.save(s)
        self.sessions.add_turn(s, t, rec.id)
        if not await repo.durable():
            log.warning("turn_not_yet_durable", session=s.id, request_id=rec.id)
