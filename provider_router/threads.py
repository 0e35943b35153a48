"""Conversation threading: which session a request belongs to, where in its thread the
client's history continues, what a threaded upstream must be sent, and when the thread
advances. Knows no wire format: providers translate, this module decides. The API calls
it: `place` a turn, `hold` its chat while the API relays the reply, `record` the reply once
it completed (`chat_gone` when the upstream lost the chat meanwhile).

A session is found by a fingerprint of the request's opening (client, route, system
messages, first user message), or named by `X-Session-Id`. Its thread is the conversation
tree of the log (`history.node_key`): a threaded upstream's turns are facts about reply
nodes of that tree (the upstream's chat and reply ids).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, AsyncContextManager, AsyncIterator

import structlog
from aiohttp import web

from .config import SessionsConfig
from .errors import ApiError
from .history import fingerprint, node_key, node_keys
from .providers import Provider, is_threaded
from .routing import Route
from .records import RequestRecord, new_id
from .store.sessions import Session, SessionRepo, Turn

JOINED = web.RequestKey("joined_session", Session)  # a request's session, across its attempts
log = structlog.get_logger("provider_router.threads")

_SESSION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


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
    def __init__(self, cfg: SessionsConfig, repo: SessionRepo, providers: dict[str, Provider]) -> None:
        self.cfg = cfg
        self.repo = repo
        self.providers = providers
        self.timeout = cfg.timeout_minutes * 60.0
        self.sessions: OrderedDict[str, Session] = OrderedDict()  # active, least recently used first
        self.by_fingerprint: dict[str, str] = {}
        self.turns: dict[str, dict[bytes, Turn]] = {}  # loaded lazily per session
        self.locks = ChatLocks()
        self.created_total = 0
        self.expired_total = 0
        self.evicted_total = 0
        self._doomed_chats: list[tuple[str, str]] = []  # (provider, chat_id) to delete upstream

    async def start(self) -> None:
        """Load the active sessions a previous run left, so their upstream chats continue,
        and mark expired the ones whose time ran out while no daemon ran: from now on the
        active rows are the sessions in memory, which `expire` ends in time."""
        now = time.time()
        for s in await self.repo.load_active(now):
            self._remember(s)
        self.repo.expire_stored(now)

    # -- sessions ------------------------------------------------------------------------
    def _remember(self, s: Session) -> None:
        self.sessions[s.id] = s
        self.sessions.move_to_end(s.id)
        if not s.metadata.get("explicit"):  # a named session is joined only by its name
            self.by_fingerprint[s.fingerprint] = s.id

    def _end(self, s: Session, reason: str) -> None:
        s.state = "expired"
        s.metadata = {**s.metadata, "ended": reason}
        self.sessions.pop(s.id, None)
        if self.by_fingerprint.get(s.fingerprint) == s.id:
            del self.by_fingerprint[s.fingerprint]
        turns = self.turns.pop(s.id, None)
        self.repo.save(s)
        if reason == "evicted":
            self.evicted_total += 1
        else:
            self.expired_total += 1
        provider = self.providers.get(s.provider)
        if is_threaded(provider) and provider.delete_chats:
            chats = {t.chat_id for t in (turns or {}).values() if t.chat_id} | ({s.chat_id} if s.chat_id else set())
            self._doomed_chats += [(s.provider, c) for c in chats]

    def _new(
        self, sid: str, fp: str, client: str, route: Route, request: web.Request, now: float, explicit: bool = False
    ) -> Session:
        while len(self.sessions) >= self.cfg.max_sessions:
            _, oldest = next(iter(self.sessions.items()))
            self._end(oldest, "evicted")
        s = Session(
            id=sid,
            fingerprint=fp,
            client=client,
            provider=route.provider.name,
            upstream_model=route.upstream_model,
            created=now,
            last_access=now,
            expires=now + self.timeout,
            metadata={"user_agent": request.headers.get("User-Agent"), "client": client},
            stored=False,
        )
        if explicit:
            s.metadata["explicit"] = True
        threaded = self.providers[route.provider.name].threaded
        if not threaded:
            s.chat_id = sid  # stateless upstreams: the conversation's id is our own
        self.turns[sid] = {}
        self._remember(s)
        if explicit or threaded:
            self.repo.create(s)
        # else: a one-shot request pays for no session row; a second request stores it.
        self.created_total += 1
        return s

    async def _session(
        self, request: web.Request, client: str, route: Route, messages: list[dict[str, Any]], now: float
    ) -> Session:
        fp = fingerprint(client, route.provider.name, route.upstream_model, messages)
        explicit = request.headers.get("X-Session-Id")
        if explicit is not None:
            if not _SESSION_ID.match(explicit):
                raise ApiError(400, "X-Session-Id must be 1-128 characters of A-Z a-z 0-9 . _ : -", param="X-Session-Id")
            s = self.sessions.get(explicit)
            if s is None:
                s = await self.repo.load(explicit)
                s = self.sessions.get(explicit) or s  # a concurrent request may have started it
            if s is not None and s.client != client:
                # Never reveal, or join, another client's session.
                raise ApiError(404, f"No session {explicit}.", code="session_not_found", param="X-Session-Id")
            if s is None:
                return self._new(explicit, fp, client, route, request, now, explicit=True)
            if (s.provider, s.upstream_model) == (route.provider.name, route.upstream_model):
                if s.id not in self.sessions:  # an expired session named again comes back
                    s.state = "active"
                    self._remember(s)
                return s
            joined = request.get(JOINED)
            if joined is None or joined.id != s.id:
                raise ApiError(
                    409,
                    f"Session {explicit} belongs to {s.provider}/{s.upstream_model}, not {route.provider.name}/{route.upstream_model}.",
                    code="session_route_mismatch",
                    param="X-Session-Id",
                )
            # This request's own fallback left the named session's route: the fallback route
            # holds it in a session of its own, as it would without the header.
        sid = self.by_fingerprint.get(fp)
        s = self.sessions.get(sid) if sid else None
        if s is not None and s.expires <= now:
            self._end(s, "expired")
            s = None
        if s is None:
            s = self._new(new_id(), fp, client, route, request, now)
        return s

    async def _turns(self, s: Session) -> dict[bytes, Turn]:
        turns = self.turns.get(s.id)
        if turns is None:
            turns = {t.message_hash: t for t in await self.repo.load_turns(s.id)}
            self.turns[s.id] = turns
        return turns

    # -- the request path ---------------------------------------------------------------
    async def join(self, request: web.Request, rec: RequestRecord, route: Route, messages: list[dict[str, Any]]) -> Session:
        """Find or start the request's session and count the request in it.

        On a stateless upstream this is all the request path does: the full history
        travels, and where it continues matters only to the log, so the log writer
        process threads it once it has assembled the reply (`rec.log_turn`).

        Each attempt of a request joins (retries, fallbacks): a request counts once, in
        the session that holds it last, as its log row does."""
        now = time.time()
        s = await self._session(request, rec.client or "anonymous", route, messages, now)
        s.last_access = now
        s.expires = now + self.timeout
        before = request.get(JOINED)  # the session an earlier attempt joined, if any
        if before is not s:
            s.request_count += 1
            if not s.stored:
                if s.first is None:
                    s.first = rec
                elif s.first is not rec:
                    self._store(s, rec)
            if before is not None:  # a fallback moved it (or the first was evicted meanwhile)
                before.request_count -= 1
                if (
                    before.request_count <= 0
                    and not before.metadata.get("explicit")
                    and self.sessions.get(before.id, before) is before  # not a copy loaded since
                ):
                    # It holds no request, past or in flight: this one started it, then left
                    # for another route. Kept, it would list as an empty session and take a
                    # `max_sessions` slot; the next request of the conversation starts anew.
                    self.delete(before.id)
                else:
                    self.repo.save(before)
            request[JOINED] = s
        self.sessions.move_to_end(s.id)
        rec.session_id = s.id
        rec.log_session = s.stored or s.first is not rec
        if not self.providers[route.provider.name].threaded:
            rec.chat_id = s.id
            s.message_count = len(messages)
        self.repo.save(s)
        return s

    def _store(self, s: Session, rec: RequestRecord) -> None:
        """A second request continues a conversation: from now on it is a stored session,
        and the request that started it joins it in the log."""
        self.repo.create(s)
        first, s.first = s.first, None
        if first is not None:
            if first.handed:
                rec.attach = first.id  # its row is written: the writer links it
            else:
                first.log_session = True

    async def place(self, request: web.Request, rec: RequestRecord, route: Route, messages: list[dict[str, Any]]) -> Placement:
        """A turn on a threaded upstream: join its session and find where the history
        continues, so that only what the upstream has not seen is sent."""
        s = await self.join(request, rec, route, messages)
        keys = node_keys(messages)  # each message keyed once per request
        rec.turn = sum(m.get("role") == "assistant" for m in messages) + 1
        k, node = _place(messages, keys, await self._turns(s))
        if node is None:  # never seen: a new chat with the whole history
            return Placement(s, None, None, messages, messages, keys)
        return Placement(s, node.chat_id, node.reply_id, messages[k:], messages, keys)

    def hold(self, p: Placement) -> AsyncContextManager[None]:
        """Held while the turn is upstream: a turn continuing a chat waits for the chat's
        turn in flight (429 after `lock_wait_seconds`); a new chat waits for nothing."""
        if p.chat_id is None:
            return contextlib.nullcontext()
        return self.locks.hold(p.chat_id, self.cfg.lock_wait_seconds)

    def chat_gone(self, p: Placement, reason: str) -> Placement:
        """The upstream no longer knows the chat the turn continued: forget its turns and
        place the turn again, in a new chat carrying the whole history. A new chat lost
        at once is the upstream's failure (502)."""
        if p.chat_id is None:
            raise ApiError(502, f"upstream lost the chat: {reason}", code="upstream_error")
        log.info("chat_gone", session=p.session.id, chat_id=p.chat_id)
        self._forget_chat(p.session, p.chat_id)
        return Placement(p.session, None, None, p.history, p.history, p.keys)

    def _forget_chat(self, s: Session, chat_id: str) -> None:
        turns = self.turns.get(s.id, {})
        for h in [h for h, t in turns.items() if t.chat_id == chat_id]:
            del turns[h]
        self.repo.forget_chat(s.id, chat_id)

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
        if s.id in self.sessions:  # an evicted session keeps no turns in memory
            self.turns.setdefault(s.id, {})[h] = t
        s.chat_id, s.parent_id = rec.chat_id, rec.reply_id
        s.message_count = len(p.history) + 1
        self.repo.save(s)
        self.repo.add_turn(s.id, t, rec.id, s.last_access)
        if not await self.repo.durable():
            log.warning("turn_not_yet_durable", session=s.id, request_id=rec.id)

    # -- lifecycle ------------------------------------------------------------------------
    def refresh(self, session_id: str, now: float | None = None) -> Session | None:
        """Extend an active session's sliding timeout from now."""
        s = self.sessions.get(session_id)
        if s is None:
            return None
        now = time.time() if now is None else now
        s.last_access, s.expires = now, now + self.timeout
        self.sessions.move_to_end(session_id)
        self.repo.save(s)
        return s

    def delete(self, session_id: str) -> None:
        """Forget a session everywhere (its turns go with it; its request rows stay). A
        request of it still in flight finishes for its client but records nothing more."""
        s = self.sessions.pop(session_id, None)
        if s is not None:
            s.state = "deleted"  # never stored: saves and turns of it are skipped from now on
            if self.by_fingerprint.get(s.fingerprint) == session_id:
                del self.by_fingerprint[s.fingerprint]
        self.turns.pop(session_id, None)
        self.repo.delete(session_id)

    def expire(self, now: float | None = None) -> int:
        """End every session whose sliding timeout has passed; returns how many."""
        now = time.time() if now is None else now
        ended = [s for s in self.sessions.values() if s.expires <= now]
        for s in ended:
            self._end(s, "expired")
        return len(ended)

    async def delete_doomed_chats(self) -> None:
        """Delete upstream chats of ended sessions (when the provider is configured to)."""
        doomed, self._doomed_chats = self._doomed_chats, []
        for provider_name, chat_id in doomed:
            provider = self.providers.get(provider_name)
            try:
                if is_threaded(provider):
                    await provider.delete_chat(chat_id)
            except Exception as e:  # best effort: the upstream expires chats itself too
                log.warning("chat_delete_failed", chat_id=chat_id, error=str(e))

    def stats(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        ages = [now - s.created for s in self.sessions.values()]
        return {
            "active": len(self.sessions),
            "created_total": self.created_total,
            "expired_total": self.expired_total,
            "evicted_total": self.evicted_total,
            "oldest_age_seconds": round(max(ages), 3) if ages else None,
            "newest_age_seconds": round(min(ages), 3) if ages else None,
        }

    async def run_cleanup(self) -> None:
        """The periodic cleanup loop: owned by the app, cancelled on shutdown."""
        interval = self.cfg.cleanup_interval_minutes * 60.0
        while True:
            await asyncio.sleep(interval)
            n = self.expire()
            if n:
                log.info("sessions_expired", count=n, active=len(self.sessions))
            await self.delete_doomed_chats()
