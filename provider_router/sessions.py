"""Sessions: which conversation a request belongs to, and each session's life: created
from its first request (or named by `X-Session-Id`), joined by the requests that continue
it, refreshed by each, ended when idle past its timeout, evicted past `max_sessions`,
deleted on demand, recovered at start. Threads (threads.py) place turns in them.

A session is found by a fingerprint of the request's opening (client, route, system
messages, first user message), or named by `X-Session-Id`. Each event of its life is one log
line and one count in the database (`session_tallies`); the upstream chats of ended and
deleted sessions are deleted where the provider is configured to, each deletion recorded.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from typing import Any

import structlog
from aiohttp import web

from .config import SessionsConfig
from .errors import ApiError
from .history import fingerprint
from .providers import ChatGone, Provider, ThreadedProvider, is_threaded
from .records import RequestRecord, new_id
from .routing import Route
from .store.locks import Coordination, local
from .store.session_reads import EVENTS, pick
from .store.sessions import Session, SessionStore, StoreUnavailable, Turn

JOINED = web.RequestKey("joined_session", Session)  # a request's session, across its attempts
# The session a request started, if it started one (`X-Session-New` says whether it is the
# one it joined): known where the session is made, not from its request count, which
# another instance's turn may not have committed yet.
CREATED = web.RequestKey("created_session", Session)
log = structlog.get_logger("provider_router.sessions")

_SESSION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Fields of a session another instance may have changed since this one cached it.
_SHARED_FIELDS = ("chat_id", "parent_id", "state", "expires", "last_access", "request_count", "message_count", "metadata")


def unavailable() -> ApiError:
    return ApiError(
        503, "The session store's database does not answer; this conversation's thread cannot be read. Try again shortly.",
        code="database_unavailable", outcome="rejected",  # refused here: nothing reached the upstream
    )  # fmt: skip


def busy(wait: float) -> ApiError:
    return ApiError(429, f"This conversation is busy with another request (waited {wait:g}s).", code="conversation_busy")


class Sessions:
    """A daemon alone keeps its active sessions in memory as their authority (`active`),
    writing them behind through the log writer. Instances sharing the database
    (`coord.shared`) keep `active` as a cache only: a threaded or named session is read
    from the database on each request (its row, then its turns), found and created under
    a lock the instances share, and its changes are committed before another instance
    can see the next turn; expiry and the chat sweep run on the leader."""

    def __init__(
        self, cfg: SessionsConfig, repo: SessionStore, providers: dict[str, Provider], coord: Coordination | None = None
    ) -> None:
        self.cfg = cfg
        self.repo = repo
        self.providers = providers
        self.coord = coord or local()
        self.shared = self.coord.shared
        self.locks = self.coord.locks
        self.timeout = cfg.timeout_minutes * 60.0
        self.active: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self.by_fingerprint: dict[str, str] = {}
        self._turns: dict[str, dict[bytes, Turn]] = {}  # per active session, loaded lazily
        # Event counts, as the database's tallies had them at start, kept in step since.
        self.created_total = self.expired_total = self.evicted_total = self.deleted_total = 0
        self._sweeping = asyncio.Lock()  # one pass over the chats to delete at a time
        self._warned_down = -1e9  # when `session_store_unavailable` was last said

    async def start(self) -> None:
        """Load the active sessions a previous run left, so their upstream chats continue,
        and mark expired the ones whose time ran out while no daemon ran: from now on the
        active rows are the sessions in memory, which `expire` ends in time."""
        now = time.time()
        counts = await self.repo.tallies()
        self.created_total, self.expired_total, self.evicted_total, self.deleted_total = (counts[e] for e in EVENTS)
        if self.coord.leader.lead():  # instances sharing the database: one of them does it
            await self._expire_stored(now, while_down=not self.shared)
        if self.shared:
            return  # the database is the authority: sessions are read as requests name them
        for s in await self.repo.load_active(now):
            self._remember(s)
            log.info(
                "session_recovered", session_id=s.id, client=s.client, provider=s.provider, requests=s.request_count,
                expires_in_seconds=round(s.expires - now, 3),
            )  # fmt: skip

    async def _expire_stored(self, now: float, while_down: bool = False) -> None:
        """End (and log, and count) the stored active sessions past their expiry."""
        for sid, client, last in await self.repo.expiring(now):
            log.info("session_expired", session_id=sid, client=client, idle_seconds=round(now - last, 3), while_down=while_down)
            self.expired_total += 1
        self.repo.expire_stored(now)
        await self.repo.durable()  # committed before the first request, and the figures read it

    async def _evict_stored(self, now: float) -> None:
        """Where instances share the database (each caches at most `max_sessions`): end
        the stored active sessions beyond `max_sessions`, least recently used first."""
        for sid, client, last in await self.repo.beyond_max(self.cfg.max_sessions):
            log.info("session_evicted", session_id=sid, client=client, idle_seconds=round(now - last, 3))
            self.evicted_total += 1
            self.repo.evict_stored(sid)
            cached = self.active.get(sid)
            if cached is not None:
                self._drop(cached)
        await self.repo.durable()

    def _remember(self, s: Session) -> None:
        self.active[s.id] = s
        self.active.move_to_end(s.id)
        if not s.metadata.get("explicit"):  # a named session is joined only by its name
            self.by_fingerprint[s.fingerprint] = s.id

    def _end(self, s: Session, reason: str, now: float) -> None:
        """End `s` (`reason`: expired or evicted); its upstream chats are deleted by the next
        sweep (`delete_doomed_chats`) where its provider is configured to."""
        s.state = "expired"
        s.metadata = {**s.metadata, "ended": reason}
        self._drop(s)
        self.repo.end(s, reason)
        if not s.stored:  # a one-shot request on a stateless upstream: no session to speak of
            return
        if reason == "evicted":
            self.evicted_total += 1
        else:
            self.expired_total += 1
        log.info(f"session_{reason}", session_id=s.id, client=s.client, idle_seconds=round(now - s.last_access, 3), requests=s.request_count)

    def _drop(self, s: Session) -> None:
        """Forget `s` in this process (it lives on in the database)."""
        self.active.pop(s.id, None)
        if self.by_fingerprint.get(s.fingerprint) == s.id:
            del self.by_fingerprint[s.fingerprint]
        self._turns.pop(s.id, None)

    def _make_room(self, now: float) -> None:
        while len(self.active) >= self.cfg.max_sessions:
            _, oldest = next(iter(self.active.items()))
            if self.shared:
                self._drop(oldest)  # a cache: the session stays active for the other instances
            else:
                self._end(oldest, "evicted", now)

    def _adopt(self, row: Session | None, cached: Session | None) -> Session | None:
        """The session as the database has it now (`row`; None: none there), kept in the
        object this process caches for it, if any: requests in flight hold that object."""
        if row is None:
            if cached is not None:
                self._drop(cached)  # ended or deleted by another instance, or the CLI
            return None
        if cached is not None and cached.id != row.id:
            self._drop(cached)
        s = cached if cached is not None and cached.id == row.id and cached.state != "deleted" else row
        if s is not row:
            for name in _SHARED_FIELDS:
                setattr(s, name, getattr(row, name))
            s.stored, s.first = True, None
        if s.state == "active":
            self._remember(s)
        else:
            self._drop(s)
        return s

    async def _named(self, explicit: str) -> Session | None:
        """The session a request names, as this process knows it: from memory, else its
        row; where instances share the database, from its row (kept in the cached object)."""
        cached = self.active.get(explicit)
        if cached is not None and not self.shared:
            return cached
        if cached is not None:  # this process's own changes to it committed first, or the row is behind them
            await self.repo.durable()
        row = await self.repo.load(explicit)
        if not self.shared:
            return self.active.get(explicit) or row  # a concurrent request may have started it
        return self._adopt(row, self.active.get(explicit))

    def _create(self, s: Session) -> None:
        """Store a new session's row: from now on it counts as created."""
        self.repo.create(s)
        self.created_total += 1
        log.info(
            "session_created", session_id=s.id, client=s.client, provider=s.provider, model=s.upstream_model,
            named=bool(s.metadata.get("explicit")),
        )  # fmt: skip

    def _revive(self, s: Session, now: float) -> None:
        """An ended session named again (by a request or a refresh) is active again; its
        `ended` reason goes."""
        self._make_room(now)
        s.state = "active"
        s.metadata = {k: v for k, v in s.metadata.items() if k != "ended"}
        self._remember(s)
        log.info("session_revived", session_id=s.id, client=s.client)

    def _new(
        self, sid: str, fp: str, client: str, route: Route, request: web.Request, now: float, explicit: bool = False
    ) -> Session:
        self._make_room(now)
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
        self._turns[sid] = {}
        self._remember(s)
        request[CREATED] = s
        if explicit or threaded:
            self._create(s)
        # else: a one-shot request pays for no session row; a second request stores it.
        return s

    async def _find(
        self, request: web.Request, client: str, route: Route, fp: str, explicit: str | None, threaded: bool, now: float
    ) -> Session:
        """The session of a request that names one, or of any request where instances share
        the database (`join` finds the others in memory, with nothing to await)."""
        if explicit is not None and not _SESSION_ID.match(explicit):
            raise ApiError(400, "X-Session-Id must be 1-128 characters of A-Z a-z 0-9 . _ : -", param="X-Session-Id")
        if not self.shared or (explicit is None and not threaded):
            return await self._found(request, client, route, fp, explicit, threaded, now)
        # Instances sharing the database find or start a session one at a time, and a new
        # one is committed before the next may look: one session (one upstream chat) for
        # concurrent first turns, wherever they land.
        wait = self.cfg.lock_wait_seconds
        key = f"session:{explicit}" if explicit is not None else f"opening:{fp}"
        try:
            release = await self.locks.acquire(key, asyncio.get_running_loop().time() + wait)
        except TimeoutError:
            raise busy(wait) from None
        try:
            created = self.created_total
            s = await self._found(request, client, route, fp, explicit, threaded, now)
            if self.created_total != created:
                await self.repo.durable()
            return s
        finally:
            release()

    async def _found(
        self, request: web.Request, client: str, route: Route, fp: str, explicit: str | None, threaded: bool, now: float
    ) -> Session:
        if explicit is not None:
            s = await self._named(explicit)
            if s is not None and s.client != client:
                # Never reveal, or join, another client's session.
                raise ApiError(404, f"No session {explicit}.", code="session_not_found", param="X-Session-Id")
            if s is None:
                return self._new(explicit, fp, client, route, request, now, explicit=True)
            if (s.provider, s.upstream_model) == (route.provider.name, route.upstream_model):
                if s.id not in self.active:  # an expired session named again comes back
                    self._revive(s, now)
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
        s = self.active.get(sid) if sid else None
        if self.shared and (s is None or threaded):  # another instance may have started or ended it
            try:
                if s is not None:  # as in _named: the row must not be behind this process's own changes
                    await self.repo.durable()
                s = self._adopt(await self.repo.find_active(fp, now), s)
            except StoreUnavailable as e:
                if threaded:
                    raise unavailable() from e
                # The full history travels to a stateless upstream either way: only the
                # log's grouping of this request may differ, so it is served.
                self._store_down(e)
        return self._live(s, request, client, route, fp, now)

    def _store_down(self, e: StoreUnavailable) -> None:
        now = time.monotonic()
        if now - self._warned_down >= 10.0:
            self._warned_down = now
            log.warning("session_store_unavailable", error=str(e), serving="stateless requests, each in a session of its own")

    def _live(self, s: Session | None, request: web.Request, client: str, route: Route, fp: str, now: float) -> Session:
        """`s`, the session found by the request's opening, unless it is none or past its
        expiry (then ended): a new one."""
        if s is not None and s.expires <= now:
            self._end(s, "expired", now)
            s = None
        if s is None:
            s = self._new(new_id(), fp, client, route, request, now)
        return s

    async def turns(self, s: Session) -> dict[bytes, Turn]:
        """The session's recorded turns by reply node (loaded once; where instances share
        the database, read each time: another may have recorded one since)."""
        turns = self._turns.get(s.id)
        if turns is None or self.shared:
            try:
                turns = {t.message_hash: t for t in await self.repo.load_turns(s.id)}
            except StoreUnavailable as e:
                raise unavailable() from e
            self._turns[s.id] = turns
        return turns

    def add_turn(self, s: Session, t: Turn, request_id: str) -> None:
        if s.id in self.active:  # an evicted session keeps no turns in memory
            self._turns.setdefault(s.id, {})[t.message_hash] = t
        self.repo.add_turn(s.id, t, request_id, s.last_access)

    async def current_chat(self, s: Session) -> str | None:
        """The session's upstream chat now: a turn that waited to make it may find it made,
        here or, where instances share the database, by another instance."""
        if self.shared:
            await self.repo.durable()  # a chat this process forgot is forgotten there too
            row = await self.repo.load(s.id)
            if row is not None:
                s.chat_id = row.chat_id
        return s.chat_id

    async def chat_made(self, s: Session, chat_id: str) -> None:
        """A turn made the session's upstream chat: the turns that waited for it go there,
        and other instances see it before they may look (they wait on the same lock)."""
        s.move(chat_id, s.parent_id)
        self.repo.save(s)
        if self.shared:
            await self.repo.durable()

    def forget_chat(self, s: Session, chat_id: str) -> None:
        """The upstream lost `chat_id`: the session's turns in it are gone too, and if it was
        the session's chat, the session has none until a turn makes one."""
        turns = self._turns.get(s.id, {})
        for h in [h for h, t in turns.items() if t.chat_id == chat_id]:
            del turns[h]
        self.repo.forget_chat(s.id, chat_id)
        if s.chat_id == chat_id:
            s.chat_id = None
            self.repo.save(s)

    # -- the request path ---------------------------------------------------------------
    async def join(self, request: web.Request, rec: RequestRecord, route: Route, messages: list[dict[str, Any]]) -> Session:
        """Find or start the request's session and count the request in it.

        On a stateless upstream this is all the request path does: the full history
        travels, and where it continues matters only to the log, so the log writer
        process puts it in the conversation tree once it has assembled the reply.

        Each attempt of a request joins (retries, fallbacks): a request counts once, in
        the session that holds it last, as its log row does."""
        now = time.time()
        client = rec.client or "anonymous"
        threaded = self.providers[route.provider.name].threaded
        fp = fingerprint(client, route.provider.name, route.upstream_model, messages)
        explicit = request.headers.get("X-Session-Id")
        if explicit is None and not self.shared:  # the usual request: in memory, nothing to await
            sid = self.by_fingerprint.get(fp)
            s = self._live(self.active.get(sid) if sid else None, request, client, route, fp, now)
        else:
            try:
                s = await self._find(request, client, route, fp, explicit, threaded, now)
            except StoreUnavailable as e:  # a named or threaded session's row could not be read
                raise unavailable() from e
        s.last_access = now
        s.expires = now + self.timeout
        # The session an earlier attempt joined, if any (it set `rec.session_id`): most
        # requests are one attempt, and a missed lookup raises and catches a KeyError.
        before = request[JOINED] if rec.session_id is not None else None
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
                    and self.active.get(before.id, before) is before  # not a copy loaded since
                ):
                    # It holds no request, past or in flight: this one started it, then left
                    # for another route. Kept, it would list as an empty session and take a
                    # `max_sessions` slot; the next request of the conversation starts anew.
                    self.delete(before.id, by="fallback")
                else:
                    self.repo.save(before)
            request[JOINED] = s
        self.active.move_to_end(s.id)
        rec.session_id = s.id
        rec.log_session = s.stored or s.first is not rec
        if not threaded:
            rec.chat_id = s.id
            s.message_count = len(messages)
        self.repo.save(s)
        if self.shared and explicit is not None and not threaded:
            # Its next turn may reach another instance, which reads the row: committed before
            # the reply, as a threaded turn is when it ends (its counts would be read stale).
            await self.repo.durable()
        return s

    def _store(self, s: Session, rec: RequestRecord) -> None:
        """A second request continues a conversation: from now on it is a stored session,
        and the request that started it joins it in the log."""
        self._create(s)
        first, s.first = s.first, None
        if first is not None:
            if first.handed:
                rec.attach = first.id  # its row is written: the writer links it
            else:
                first.log_session = True

    # -- lifecycle ------------------------------------------------------------------------
    async def resolve(self, prefix: str, client: str | None = None) -> str | None:
        """The session `prefix` names (its id, or the only id that starts with it), of
        `client` only if given; None if none; `AmbiguousId` if several."""
        prefix = prefix.strip()
        if not prefix:
            return None
        await self.repo.durable()  # a change queued just before is seen
        live = {sid for sid, s in self.active.items() if sid.startswith(prefix) and client in (None, s.client)}
        return pick(prefix, live | set(await self.repo.ids(prefix, client)))

    async def get(self, session_id: str) -> Session | None:
        """The session as the daemon has it: in memory if active, else its stored row
        (where instances share the database, its row)."""
        if self.shared:
            await self.repo.durable()
            return self._adopt(await self.repo.load(session_id), self.active.get(session_id))
        return self.active.get(session_id) or await self.repo.load(session_id)

    async def refresh(self, session_id: str, now: float | None = None) -> Session | None:
        """Extend a session's sliding timeout from now; an ended one is revived."""
        now = time.time() if now is None else now
        s = self.active.get(session_id)
        if self.shared:
            await self.repo.durable()
            s = self._adopt(await self.repo.load(session_id), s)
        if s is None:
            loaded = await self.repo.load(session_id)
            s = self.active.get(session_id) or loaded  # a request may have revived it meanwhile
            if s is None:
                return None
            if s.id not in self.active:
                self._revive(s, now)
        s.last_access, s.expires = now, now + self.timeout
        self.active.move_to_end(session_id)
        self.repo.save(s)
        return s

    def delete(self, session_id: str, by: str = "admin") -> None:
        """Forget a session everywhere (its turns go with it; its request rows stay; its
        upstream chats are kept for the next sweep). A request of it still in flight
        finishes for its client but records nothing more. `by` says who asked (client,
        admin, fallback: a request that left it for another route), for the log line."""
        s = self.active.pop(session_id, None)
        if s is not None:
            s.state = "deleted"  # never stored: saves and turns of it are skipped from now on
            if self.by_fingerprint.get(s.fingerprint) == session_id:
                del self.by_fingerprint[s.fingerprint]
        self._turns.pop(session_id, None)
        self.repo.delete(session_id)
        if s is None or s.stored:
            self.deleted_total += 1
            log.info("session_deleted", session_id=session_id, by=by, client=s.client if s else None)

    def expire(self, now: float | None = None) -> int:
        """End every session whose sliding timeout has passed; returns how many (where
        instances share the database: those this one had in memory; every stored one ends)."""
        now = time.time() if now is None else now
        ended = [s for s in self.active.values() if s.expires <= now]
        for s in ended:
            if self.shared:
                self._drop(s)
            else:
                self._end(s, "expired", now)
        if self.shared:
            self.repo.expire_stored(now)
        return len(ended)

    def _deleting_chats(self) -> dict[str, ThreadedProvider]:
        return {name: p for name, p in self.providers.items() if is_threaded(p) and p.delete_chats}

    async def delete_doomed_chats(self, session_id: str | None = None) -> int:
        """Delete upstream the chats of ended and deleted sessions (of one, if given) where
        the provider is configured to (`delete_chats_on_expiry`), whenever they ended: at
        start this covers sessions that ended while no daemon ran, or were deleted by hand.
        Each attempt is recorded, so a chat is deleted once and a failing one is retried a
        bounded number of times. Returns how many were deleted."""
        providers = self._deleting_chats()
        if not providers:
            return 0
        async with self._sweeping:
            await self.repo.durable()  # the ends and deletes queued so far are in the rows
            done = 0
            for name, chat_id, sid in await self.repo.chats_to_delete(sorted(providers), session_id):
                if sid in self.active:  # revived, or a new session under that name: in use
                    continue
                try:
                    await providers[name].delete_chat(chat_id)
                except ChatGone:
                    pass  # the upstream forgot it already: nothing left to delete
                except Exception as e:  # best effort: the upstream expires chats itself too
                    # The class and status only: an upstream's message may echo credentials.
                    error = f"{type(e).__name__} {getattr(e, 'status', '')} {getattr(e, 'code', '') or ''}".strip()
                    self.repo.chat_deleted(name, chat_id, sid, time.time(), error=error)
                    log.warning("chat_delete_failed", session_id=sid, chat_id=chat_id, provider=name, error=error)
                    continue
                self.repo.chat_deleted(name, chat_id, sid, time.time())
                log.info("upstream_chat_deleted", session_id=sid, chat_id=chat_id, provider=name)
                done += 1
            return done

    def stats(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        ages = [now - s.created for s in self.active.values()]
        return {
            "active": len(self.active),
            "created_total": self.created_total,
            "expired_total": self.expired_total,
            "evicted_total": self.evicted_total,
            "deleted_total": self.deleted_total,
            "oldest_age_seconds": round(max(ages), 3) if ages else None,
            "newest_age_seconds": round(min(ages), 3) if ages else None,
        }

    async def run_cleanup(self) -> None:
        """The periodic cleanup loop: owned by the app, cancelled on shutdown."""
        interval = self.cfg.cleanup_interval_minutes * 60.0
        while True:  # a pass at start too: chats of sessions that ended while no daemon ran
            try:
                if not self.shared:
                    self.expire()
                elif self.coord.leader.lead():  # one of the instances sharing the database
                    now = time.time()
                    for s in [s for s in self.active.values() if s.expires <= now]:
                        self._drop(s)
                    await self._expire_stored(now)
                    await self._evict_stored(now)
                if self.coord.leader.lead():
                    await self.delete_doomed_chats()
            except Exception as e:  # the database is being reopened, say: the next pass retries
                log.warning("chat_sweep_failed", error=repr(e))
            await asyncio.sleep(interval)
