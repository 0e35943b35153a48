"""Conversation threading: where in its session's thread the client's history continues,
what a threaded upstream must be sent, and when the thread advances. Knows no wire format:
providers translate, this module decides. The API calls it: `place` a turn, `hold` its chat
while the API relays the reply (to the end of the upstream's body; a busy chat is waited
out there), `record` the reply once it completed (`chat_gone` when the upstream lost the
chat meanwhile). A session has one upstream chat: a turn with no reply to continue from is
a new branch at its root.

A session's thread is the conversation tree of the log (`history.node_key`): a threaded
upstream's turns are facts about reply nodes of that tree (the upstream's chat and reply
ids). Sessions themselves (which one a request belongs to, their life) are sessions.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Awaitable, Callable

import structlog
from aiohttp import web

from .errors import ApiError
from .history import node_key, node_keys
from .records import RequestRecord
from .routing import Route
from .sessions import Sessions, busy
from .store.locks import ChatLocks, Release
from .store.sessions import Session, Turn

log = structlog.get_logger("provider_router.threads")


def founding(s: Session) -> str:
    return f"founding:{s.id}"  # never a chat id: those are the upstream's


@dataclass(slots=True)
class Placement:
    """Where a turn continues in its session's thread, and what its upstream must be sent:
    the messages after the reply it continues (`parent_id` in `chat_id`), or the whole
    history as a new branch at the root of the session's chat (`parent_id` None), or of a
    chat yet to be made (`chat_id` None too)."""

    session: Session
    chat_id: str | None
    parent_id: str | None
    messages: list[dict[str, Any]]  # to send
    history: list[dict[str, Any]]  # as the client sent it
    keys: list[bytes]  # `history`'s node keys
    new: bool = False  # this turn made its chat


class Held:
    """A turn's hold on its chat: where the turn goes, and the time it may still wait there."""

    def __init__(self, placement: Placement, deadline: float, wait: float) -> None:
        self.placement = placement
        self._deadline = deadline
        self._wait = wait
        self._tries = 0

    async def busy(self) -> None:
        """The upstream still counts another turn in the chat as running (one it has not
        ended on its side, or one sent from elsewhere): pause before sending again, with
        a bounded backoff, or 429 once the turn's `lock_wait_seconds` are spent."""
        left = self._deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise busy(self._wait)
        await asyncio.sleep(min(0.05 * 2**self._tries, 1.0, left))
        self._tries += 1


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
        self.locks: ChatLocks = sessions.locks  # in this process, or across the instances on one database

    async def _lock(self, key: str, deadline: float, wait: float) -> Release:
        try:
            return await self.locks.acquire(key, deadline)
        except TimeoutError:
            raise busy(wait) from None

    async def place(self, request: web.Request, rec: RequestRecord, route: Route, messages: list[dict[str, Any]]) -> Placement:
        """A turn on a threaded upstream: join its session and find where the history
        continues, so that only what the upstream has not seen is sent."""
        s = await self.sessions.join(request, rec, route, messages)
        keys = node_keys(messages)  # each message keyed once per request
        rec.turn = sum(m.get("role") == "assistant" for m in messages) + 1
        k, node = _place(messages, keys, await self.sessions.turns(s))
        if node is None:  # nothing to continue from: the whole history, at the root
            return Placement(s, s.chat_id, None, messages, messages, keys)
        return Placement(s, node.chat_id, node.reply_id, messages[k:], messages, keys)

    @contextlib.asynccontextmanager
    async def hold(self, p: Placement, new_chat: Callable[[], Awaitable[str]]) -> AsyncIterator[Held]:
        """Held while the turn is upstream, to the end of the upstream's reply body: turns
        on one chat wait for the one in flight, `lock_wait_seconds` at most (then 429). A
        session's first chat is made once (`new_chat`); turns that wait for it meanwhile
        become branches at its root."""
        wait = self.sessions.cfg.lock_wait_seconds
        deadline = asyncio.get_running_loop().time() + wait
        if p.chat_id is None:
            p, release = await self._found(p, new_chat, deadline, wait)
        else:
            release = await self._lock(p.chat_id, deadline, wait)
        try:
            yield Held(p, deadline, wait)
        finally:
            release()

    async def _found(
        self, p: Placement, new_chat: Callable[[], Awaitable[str]], deadline: float, wait: float
    ) -> tuple[Placement, Release]:
        """The session's chat for a turn placed before it had one, held: made by this turn,
        or by a turn it waited for."""
        s = p.session
        release_founding = await self._lock(founding(s), deadline, wait)
        try:
            chat_id = await self.sessions.current_chat(s)  # made by a turn this one waited for?
            if chat_id is not None:
                return replace(p, chat_id=chat_id), await self._lock(chat_id, deadline, wait)
            chat_id = await new_chat()
            release = await self._lock(chat_id, deadline, wait)  # free: nobody knows it yet
            try:
                await self.sessions.chat_made(s, chat_id)
            except BaseException:
                release()
                raise
            log.info("chat_created", session=s.id, chat_id=chat_id)
            return replace(p, chat_id=chat_id, new=True), release
        finally:
            release_founding()

    def chat_gone(self, p: Placement, reason: str) -> Placement:
        """The upstream no longer knows the chat the turn went to: forget its turns and
        place the turn again with the whole history, at the root of the session's chat,
        a new one unless another turn made it meanwhile. A chat lost as soon as this turn
        made it is the upstream's failure (502)."""
        s = p.session
        if p.new or p.chat_id is None:
            raise ApiError(502, f"upstream lost the chat: {reason}", code="upstream_error")
        log.info("chat_gone", session=s.id, chat_id=p.chat_id)
        self.sessions.forget_chat(s, p.chat_id)
        return Placement(s, s.chat_id, None, p.history, p.history, p.keys)

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
        s.move(rec.chat_id, rec.reply_id)
        s.message_count = len(p.history) + 1
        repo = self.sessions.repo
        repo.save(s)
        self.sessions.add_turn(s, t, rec.id)
        if not await repo.durable():
            log.warning("turn_not_yet_durable", session=s.id, request_id=rec.id)
