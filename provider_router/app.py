"""The aiohttp app factory. Resources live in `cleanup_ctx`: the database and its writer,
the one upstream HTTP client, the session threads; they stop in reverse order, the
writer last, so every record of a finished request is flushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import AsyncIterator

import structlog
from aiohttp import web

from .api import admin as admin_api
from .api import endpoints as endpoints_api
from .api import models as models_api
from .api import openai as openai_api
from .config import Config
from .metrics import Metrics
from .middleware import edge, key_digest, stamp_headers
from .providers import build_provider
from .providers.http import new_session
from .providers.proxies import proxy_secrets
from .routing import Router
from .state import STATE, State
from .store import LogWriter, Redactor, connect, queries
from .store.records import iso
from .store.sessions import SessionRepo
from .threads import Threads

log = structlog.get_logger("provider_router")


def create_app(cfg: Config, *, db_path: str | None = None) -> web.Application:
    """Build the proxy app for `cfg`; `db_path` overrides `database.path`."""
    state = State(
        config=cfg,
        router=Router(cfg),
        db_path=db_path or cfg.database.path,
        redactor=Redactor(cfg.secrets() + proxy_secrets(cfg.providers)),
        client_keys={key_digest(k.key): k.name for k in cfg.auth.client_keys},
    )
    app = web.Application(middlewares=[edge], client_max_size=cfg.server.max_body_bytes)
    app[STATE] = state
    app.cleanup_ctx.append(_store)
    app.cleanup_ctx.append(_upstreams)
    app.cleanup_ctx.append(_threads)
    app.on_response_prepare.append(stamp_headers)
    app.on_shutdown.append(_mark_shutting_down)
    app.router.add_post("/v1/chat/completions", openai_api.chat_completions)
    app[models_api.CATALOG] = models_api.Catalog()
    app.router.add_get("/v1/models", models_api.list_models)
    app.router.add_get("/v1/models/{model:.+}", models_api.get_model)
    endpoints_api.setup(app)
    app.router.add_route("*", "/v1/{tail:.*}", endpoints_api.not_found)
    admin_api.setup(app)
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
    log.info("shutting_down", grace_seconds=grace, inflight=len(state.inflight))

    def end_inflight() -> None:
        state.ending = True
        for task in list(state.inflight):
            task.cancel()

    asyncio.get_running_loop().call_later(max(grace - min(1.0, grace * 0.2), 0.0), end_inflight)


async def _store(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    conn = await connect(state.db_path)  # applies migrations before the writer process opens the file
    logs = state.config.logs
    writer = LogWriter(
        state.db_path, max_queue=logs.queue_size, max_body_bytes=logs.max_body_bytes, secrets=state.redactor.secrets
    )
    await writer.start()
    reader = await connect(state.db_path, readonly=True)
    state.db, state.writer, state.reader = conn, writer, reader
    retention = None
    if logs.retention_days > 0:
        retention = asyncio.create_task(_retention(state.db_path, logs.retention_days), name="log-retention")
    try:
        yield
    finally:
        if retention is not None:
            retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await retention
        await writer.stop()
        state.writer = state.db = state.reader = None
        await reader.close()
        await conn.close()


async def _retention(db_path: str, days: int, interval: float = 3600.0) -> None:
    """Prune records older than `days`, in bounded batches, now and then every `interval`."""
    conn = await connect(db_path)
    try:
        while True:
            cut = iso(time.time() - days * 86400)
            result = await queries.prune(conn, cut)
            if result.requests or result.sessions:
                log.info("retention_pruned", requests=result.requests, sessions=result.sessions, older_than=cut)
            await asyncio.sleep(interval)
    finally:
        await conn.close()


async def _threads(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    assert state.db is not None and state.writer is not None
    threads = Threads(state.config.sessions, SessionRepo(state.db, state.writer), state.providers)
    await threads.start()
    state.threads = threads
    cleanup = asyncio.create_task(threads.run_cleanup(), name="session-cleanup")
    try:
        yield
    finally:
        cleanup.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await cleanup
        state.threads = None


async def _upstreams(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    http = new_session()
    state.http = http
    on_queue = state.metrics.observe_queue if state.metrics is not None else None
    state.providers = {p.name: build_provider(p, http, on_queue) for p in state.config.providers}
    try:
        yield
    finally:
        await app[models_api.CATALOG].close()  # its fetches use the session
        for provider in state.providers.values():
            await provider.close()
        await http.close()
