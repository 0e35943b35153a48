"""Running the daemon: the event loop, the listening socket, and graceful shutdown.

aiohttp's runner handles SIGINT/SIGTERM: it stops accepting, lets in-flight requests run
for the grace period, cancels the rest, then runs the app's cleanup (log flush last).
"""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web

from .app import create_app
from .config import Config
from .state import STATE

log = structlog.get_logger("provider_router")


def _loop_factory() -> type[asyncio.AbstractEventLoop] | None:
    try:
        import uvloop  # optional extra: `pip install provider-router[speed]`
    except ImportError:
        return None
    return uvloop.Loop  # type: ignore[no-any-return]


def run(cfg: Config, *, db_path: str | None = None) -> None:
    app = create_app(cfg, db_path=db_path)
    host, port = cfg.server.host, cfg.server.port

    async def announce(app: web.Application) -> None:
        log.info(
            "listening",
            url=f"http://{host}:{port}/v1",
            db=db_path or cfg.database.path,
            models=[m.name for m in app[STATE].router.available],
        )

    app.on_startup.append(announce)
    factory = _loop_factory()
    loop = factory() if factory else asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    web.run_app(
        app,
        host=host,
        port=port,
        shutdown_timeout=cfg.server.shutdown_grace_seconds,
        handler_cancellation=True,
        access_log=None,
        print=None,
        loop=loop,
    )
