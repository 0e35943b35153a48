"""The aiohttp app factory. Resources live in `cleanup_ctx`: the database and its writer
(with the task watching them), the one upstream HTTP client, the session threads; they stop
in reverse order, the writer last, so every record of a finished request is flushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from functools import partial
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine

import aiosqlite
import structlog
from aiohttp import web

from .api import admin as admin_api
from .api import chat as chat_api
from .api import endpoints as endpoints_api
from .api import models as models_api
from .api import sessions as sessions_api
from .config import Config
from .metrics import Metrics
from .middleware import edge, key_digest
from .providers import build_provider
from .providers.http import new_session
from .providers.proxies import proxy_secrets
from .routing import Router
from .startup import StartupError, database_error, postgres_error
from .state import STATE, State
from .store import LogWriter, Redactor, connect, retention
from . import location
from .store import locks
from .store.db import Reopenable
from .store.reads import SqliteReads
from .store.locks import Leader
from .records import iso
from .store.sessions import SessionRepo
from .store.watch import DbWatch, LogWatch
from .sessions import Sessions
from .threads import Threads
from .ui import handlers as ui

log = structlog.get_logger("provider_router")
# At start-up, how long to wait for a lock another process holds before saying so.
WRITE_PROBE_SECONDS = 3.0


def create_app(
    cfg: Config, *, db_path: str | None = None, shared: bool = False, worker: tuple[int, int] | None = None
) -> web.Application:
    """Build the proxy app for `cfg`; `db_path` overrides `database.path`. `shared`: other
    instances serve the same database (sessions are read from it, locks are shared);
    `worker`: (number, count) under `serve --workers N`."""
    state = State(
        config=cfg,
        router=Router(cfg),
        db_path=db_path or cfg.database.path,
        redactor=Redactor(cfg.secrets() + proxy_secrets(cfg.providers)),
        client_keys={key_digest(k.key): k.name for k in cfg.auth.client_keys},
        shared=shared,
        worker=worker,
    )
    app = web.Application(middlewares=[edge], client_max_size=cfg.server.max_body_bytes)
    app[STATE] = state
    app.cleanup_ctx.append(_store)
    app.cleanup_ctx.append(_upstreams)
    app.cleanup_ctx.append(_threads)
    app.on_shutdown.append(_mark_shutting_down)
    app.router.add_post("/v1/chat/completions", chat_api.chat_completions)
    app[models_api.CATALOG] = models_api.Catalog()
    app.router.add_get("/v1/models", models_api.list_models)
    app.router.add_get("/v1/models/{model:.+}", models_api.get_model)
    endpoints_api.setup(app)
    sessions_api.setup(app)
    app.router.add_route("*", "/v1/{tail:.*}", endpoints_api.not_found)
    admin_api.setup(app)
    ui.setup(app)
    state.metrics = Metrics(state)
    return app


async def _mark_shutting_down(app: web.Application) -> None:
    """`on_shutdown`: the listener is closed; in-flight requests now get their grace period.

    aiohttp cancels handlers when the grace ends and closes their sockets in the same
    tick, leaving no chance to tell a client why. So the app ends its own in-flight
    requests a little earlier, while their sockets are open: streams get an error event,
    the rest a 503.
    """
    state = app[STATE]
    state.shutting_down = True
    grace = state.config.server.shutdown_grace_seconds
    log.info("shutting_down", grace_seconds=0 if state.ending else grace, inflight=len(state.inflight))
    if state.ending:  # a second signal came before the listener closed
        end_grace(app)
        return
    asyncio.get_running_loop().call_later(max(grace - min(1.0, grace * 0.2), 0.0), end_grace, app)


def end_grace(app: web.Application) -> None:
    """End the grace period now: in-flight requests are cancelled and answer with their
    error (an SSE `proxy_shutdown` event, or a 503), and get their records, while their
    sockets are still open. Called when the grace runs out, or on a second signal."""
    state = app[STATE]
    state.ending = True
    for task in list(state.inflight):
        task.cancel()


async def _open(path: str) -> tuple[aiosqlite.Connection, aiosqlite.Connection]:
    """The daemon's connections to `path`, created and migrated if needed, after checking it
    can be written: a file another process holds locked fails here, not at the first record."""
    conn = await connect(path, progress=_migrating)  # applies migrations before the writer process opens the file
    try:
        for sql in (f"PRAGMA busy_timeout={int(WRITE_PROBE_SECONDS * 1000)}", "BEGIN IMMEDIATE", "ROLLBACK", "PRAGMA busy_timeout=5000"):
            async with conn.execute(sql) as cur:  # each read to its end: no statement left open
                await cur.fetchall()
        reader = await connect(path, readonly=True)
    except BaseException:
        await conn.close()
        raise
    return conn, reader


_last_progress = [0.0]


def _migrating(what: str, done: int, total: int) -> None:
    """Progress of a long migration (a large log from an earlier release): a line every few seconds."""
    now = time.monotonic()
    if now - _last_progress[0] >= 5.0 or done == total:
        _last_progress[0] = now
        log.info("migrating_database", step=what, done=done, total=total)


async def _store(app: web.Application) -> AsyncIterator[None]:
    """The log database, its writer and watch, the session store and the coordination with
    other instances: a SQLite file's, or a PostgreSQL database's."""
    state = app[STATE]
    async with contextlib.AsyncExitStack() as stack:  # each step undone even if one before it raised
        if location.is_postgres(state.db_path):
            await _postgres(state, stack)
        else:
            await _sqlite(state, stack)
        stack.callback(_clear, state)  # after the writer stopped (exits run in reverse)
        yield


def _new_writer(state: State) -> LogWriter:
    logs = state.config.logs
    return LogWriter(
        state.db_path, max_queue=logs.queue_size, max_queue_bytes=logs.queue_bytes, when_full=logs.when_full,
        max_body_bytes=logs.max_body_bytes, max_message_bytes=logs.max_message_bytes, secrets=state.redactor.secrets,
    )  # fmt: skip


async def _start_writer(state: State, writer: LogWriter, stack: contextlib.AsyncExitStack) -> None:
    try:
        await writer.start()
    except OSError as e:
        raise StartupError("cannot start the log writer process", location.shown(state.db_path), "check the Python installation", repr(e)) from e
    stack.push_async_callback(writer.stop)


async def _sqlite(state: State, stack: contextlib.AsyncExitStack) -> None:
    logs, db = state.config.logs, state.config.database
    try:
        coord = locks.shared(state.db_path) if state.shared else locks.local()
        stack.callback(coord.close)
        conn, reader = await _open(state.db_path)
    except (OSError, sqlite3.Error) as e:
        raise database_error(e, state.db_path) from e
    state.coord = coord
    handles = Reopenable(conn), Reopenable(reader)
    stack.push_async_callback(lambda: handles[0].conn.close())
    stack.push_async_callback(lambda: handles[1].conn.close())
    writer = _new_writer(state)
    await _start_writer(state, writer, stack)

    async def reopen() -> None:
        await writer.stop()  # what it holds is committed to the old file (counted lost)
        for handle in reversed(handles):
            # All closed before anything opens the path: SQLite keeps a moved file's
            # -wal and -shm at the path, and the watch sets them aside first.
            await handle.conn.close()
        watch.set_aside_stale()
        new_conn, new_reader = await _open(state.db_path)
        handles[0].swap(new_conn)
        handles[1].swap(new_reader)
        watch.opened_now()
        await writer.start()

    watch = DbWatch(
        state.db_path, writer, bound=logs.queue_size, reopen=reopen,
        interval=db.check_interval_seconds, checkpoint=db.checkpoint_interval_seconds,
    )  # fmt: skip
    state.reads = SqliteReads(handles[1])  # type: ignore[arg-type]  # follows the reopened file
    state.session_store = SessionRepo(handles[0], writer)  # type: ignore[arg-type]
    state.writer, state.watch = writer, watch
    await _task(stack, watch.run(), "database-watch")
    if logs.retention_days > 0:
        await _task(stack, _retention(partial(_prune_sqlite, state.db_path), logs.retention_days, coord.leader), "log-retention")


async def _postgres(state: State, stack: contextlib.AsyncExitStack) -> None:
    """PostgreSQL: migrated under its lock (instances starting together migrate once), a
    pool of at most `database.pool_max` connections for reads and session state, the log
    writer's connection, and one for the locks every instance shares (docs/postgresql.md)."""
    from .store.pg import daemon as pg

    logs, db = state.config.logs, state.config.database
    try:
        await pg.migrate(state.db_path, progress=_migrating)
        pool = await pg.open_pool(state.db_path, db.pool_max, name="daemon")
        stack.push_async_callback(pool.close)
        coord = await pg.coordination(state.db_path)
        stack.push_async_callback(coord.aclose)
    except pg.Error as e:
        raise postgres_error(e, state.db_path) from e
    state.coord = coord
    writer = _new_writer(state)
    await _start_writer(state, writer, stack)
    watch = LogWatch(writer, bound=logs.queue_size, interval=db.check_interval_seconds)
    state.reads = pg.PgReads(pool)
    state.session_store = pg.PgSessionRepo(pool, writer)
    state.writer, state.watch = writer, watch
    await _task(stack, watch.run(), "database-watch")
    if logs.retention_days > 0:
        await _task(stack, _retention(partial(pg.prune, state.db_path), logs.retention_days, coord.leader), "log-retention")


def _clear(state: State) -> None:
    state.writer = state.reads = state.watch = state.session_store = None


async def _task(stack: contextlib.AsyncExitStack, coro: Coroutine[Any, Any, None], name: str) -> None:
    """Run `coro` as a task the stack cancels and awaits on exit."""
    task = asyncio.create_task(coro, name=name)

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    stack.push_async_callback(stop)


async def _prune_sqlite(path: str, cut: str) -> Any:
    conn = await connect(path)  # a connection per pass: the file at the path may have been reopened since
    try:
        return await retention.prune(conn, cut)
    finally:
        await conn.close()


async def _retention(prune: Callable[[str], Awaitable[Any]], days: int, leader: Leader, interval: float = 3600.0) -> None:
    """Prune records older than `days` (`prune(cut)`, in bounded batches), now and then
    every `interval`, on the leader alone where instances share the database."""
    while True:
        if not leader.lead():
            await asyncio.sleep(interval)
            continue
        cut = iso(time.time() - days * 86400)
        try:
            result = await prune(cut)
        except Exception as e:  # the database down for a while: the next pass tries again
            log.warning("retention_failed", error=f"{type(e).__name__}: {e}", retry_seconds=interval)
        else:
            if result.requests or result.sessions:
                log.info(
                    "retention_pruned", requests=result.requests, sessions=result.sessions, messages=result.messages,
                    blobs=result.blobs, older_than=cut,
                )  # fmt: skip
        await asyncio.sleep(interval)


async def _threads(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    assert state.session_store is not None and state.coord is not None
    sessions = Sessions(state.config.sessions, state.session_store, state.providers, state.coord)
    await sessions.start()
    state.sessions, state.threads = sessions, Threads(sessions)
    cleanup = asyncio.create_task(sessions.run_cleanup(), name="session-cleanup")
    try:
        yield
    finally:
        cleanup.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await cleanup
        state.sessions = state.threads = None


async def _upstreams(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    http = new_session()
    on_queue = state.metrics.observe_queue if state.metrics is not None else None
    state.providers = {p.name: build_provider(p, http, on_queue) for p in state.config.providers}
    try:
        yield
    finally:
        await app[models_api.CATALOG].close()  # its fetches use the session
        for provider in state.providers.values():
            await provider.close()
        await http.close()
