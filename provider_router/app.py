"""The aiohttp app factory. Resources live in `cleanup_ctx`: the database and its writer,
the one upstream HTTP client, the session threads; they stop in reverse order, the
writer last, so every record of a finished request is flushed.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

import aiohttp
from aiohttp import web

from .api import openai as openai_api
from .config import Config
from .middleware import edge, key_digest, stamp_headers
from .providers import build_provider
from .routing import Router
from .state import STATE, State
from .store import LogWriter, Redactor, connect
from .store.sessions import SessionRepo
from .threads import Threads


def create_app(cfg: Config, *, db_path: str | None = None) -> web.Application:
    """Build the proxy app for `cfg`; `db_path` overrides `database.path`."""
    state = State(
        config=cfg,
        router=Router(cfg),
        db_path=db_path or cfg.database.path,
        redactor=Redactor(cfg.secrets()),
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
    app.router.add_get("/v1/models", openai_api.list_models)
    app.router.add_route("*", "/v1/{tail:.*}", openai_api.not_found)
    return app


async def _mark_shutting_down(app: web.Application) -> None:
    app[STATE].shutting_down = True


async def _store(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    conn = await connect(state.db_path)
    logs = state.config.logs
    writer = LogWriter(conn, max_queue=logs.queue_size, max_body_bytes=logs.max_body_bytes, redactor=state.redactor)
    writer.start()
    state.db, state.writer = conn, writer
    try:
        yield
    finally:
        await writer.stop()
        state.writer = state.db = None
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
    connector = aiohttp.TCPConnector(limit=512, limit_per_host=256, keepalive_timeout=30, ttl_dns_cache=300)
    # Decoded here, forwarded without Content-Encoding: the client sees plain bytes.
    http = aiohttp.ClientSession(connector=connector, auto_decompress=True, trust_env=False)
    state.http = http
    state.providers = {p.name: build_provider(p, http) for p in state.config.providers}
    try:
        yield
    finally:
        for provider in state.providers.values():
            await provider.close()
        await http.close()
