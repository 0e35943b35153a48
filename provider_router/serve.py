"""Running the daemon: the event loop, the listening socket, start-up and shutdown.

A signal (see `stopping.py`) closes the listener, in-flight requests get
`server.shutdown_grace_seconds`, then the app's cleanup flushes the log. A start-up failure
is one `startup_failed` line and exit status 1 (see `startup.py`).
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import structlog
from aiohttp import web

from .app import create_app, end_grace
from .config import Config
from .startup import StartupError, database_error, listen_error
from .state import STATE
from .stopping import HURRY_SECONDS, Signals, Watchdog
from .store.presence import Presence, hold, serving

log = structlog.get_logger("provider_router")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # optional extra `speed`: a faster event loop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()  # type: ignore[no-any-return]


async def _settle_heap(_: web.Application) -> None:
    """Once started: everything alive now (modules, config, the app) lives as long as the
    daemon, so the cyclic collector stops walking it. A full collection otherwise walks
    every object each time and stalls requests for milliseconds."""
    gc.collect()
    gc.freeze()
    # A young collection walks the objects of the requests in flight (hundreds each), finds
    # no garbage (reference counting freed it) and promotes them: with the default 700 it
    # ran every dozen requests at 32 in flight (29-50k instructions a request, callgrind;
    # bench/README.md). Young objects are collected every 20,000 allocations instead, which
    # still bounds what cyclic garbage can pile up to a few MB.
    gc.set_threshold(20_000, 10, 10)


def local_url(host: str, port: int) -> str:
    """Where a CLI on this machine reaches a daemon listening on `host`: an any-address
    (or `localhost`) is reached on loopback."""
    if host in ("", "0.0.0.0", "localhost"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _hold_mark(db: str) -> Presence | OSError | None:
    """The `<db>.daemon` mark; an OSError if it could not be made (said once the daemon
    listens: a directory that refuses the mark usually refuses the database too, and then
    that is the one line to show), or None if another daemon holds it (said here)."""
    try:
        mark = hold(db)
    except OSError as e:
        return e
    if mark is None:
        other = serving(db) or {}
        log.error(
            "database_in_use", db=db, other_pid=other.get("pid"), other_url=other.get("url"),
            hint="another daemon serves this database: stop it, or pass --db for another one",
        )  # fmt: skip
        return None
    return mark


def run(cfg: Config, *, db_path: str | None = None, traceback: bool = False) -> int:
    """Serve until SIGTERM/SIGINT/SIGHUP; the exit status. `traceback`: start-up failures
    log their traceback too (`--log-level debug`)."""
    db = db_path or cfg.database.path
    watchdog = Watchdog()
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    signals = Signals(cfg.server.shutdown_grace_seconds, watchdog)
    signals.install(loop)  # from here on no signal kills it mid-start: it stops after starting
    mark: Presence | OSError | None = None
    try:
        try:
            # Before the app loads sessions: another daemon on this database would write its own
            # copies of them over ours, and a CLI edit must know whom to ask from the start.
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise database_error(e, db) from e
        mark = _hold_mark(db)
        if mark is None:
            return 1
        return loop.run_until_complete(_serve(cfg, db, mark, signals, watchdog))
    except StartupError as e:
        watchdog.arm(HURRY_SECONDS, "start-up failed and stopping did not finish")
        log.error(
            "startup_failed", what=e.what, where=e.where, hint=e.hint, error=e.error,
            exc_info=e.__cause__ if traceback else None,
        )  # fmt: skip
        return 1
    except Exception:  # a bug, not a condition we know: its traceback is the report
        log.exception("serve_failed")
        return 1
    finally:
        # Whatever path led here, the process ends soon: a thread left running (a database
        # connection a failed step never closed) must not keep it alive.
        watchdog.arm(HURRY_SECONDS, "threads still running after the daemon stopped")
        _close_loop(loop)
        if isinstance(mark, Presence):  # released once the log is flushed: till then sessions may be written
            mark.release()


async def _serve(cfg: Config, db: str, mark: Presence | OSError, signals: Signals, watchdog: Watchdog) -> int:
    app = create_app(cfg, db_path=db)
    app.on_startup.append(_settle_heap)  # after the app's own start-up (cleanup_ctx runs first)
    signals.hurry = lambda: end_grace(app)
    host, port = cfg.server.host, cfg.server.port
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, handler_cancellation=True, shutdown_timeout=cfg.server.shutdown_grace_seconds
    )
    try:
        await runner.setup()  # the app's start-up: database, log writer, upstream client, sessions
    except StartupError:
        await _undo_start(app, watchdog)
        raise
    except Exception as e:
        await _undo_start(app, watchdog)
        raise StartupError(
            f"start-up failed: {type(e).__name__}", "the app's start-up", "run with --log-level debug for the traceback",
            f"{type(e).__name__}: {e}",
        ) from e  # fmt: skip
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except OSError as e:
        await _undo_start(app, watchdog)
        raise listen_error(e, host, port) from e
    # "listening" means ready; from then on the mark tells the CLI where to send session edits.
    bound = runner.addresses[0][1] if runner.addresses else port
    if isinstance(mark, OSError):
        log.warning("daemon_mark_failed", db=db, error=str(mark), hint="session edits from the CLI will not find this daemon")
    else:
        mark.serve_at(local_url(host, bound))
    log.info("listening", url=f"http://{host}:{bound}/v1", db=db, models=[m.name for m in app[STATE].router.available])
    try:
        await signals.stop.wait()
    finally:
        # Closes the listener, gives in-flight requests the grace (app.on_shutdown ends the
        # rest with an error), then the cleanup contexts: the log is flushed last.
        await runner.cleanup()
    log.info("stopped")
    return 0


async def _undo_start(app: web.Application, watchdog: Watchdog) -> None:
    """Stop whatever started before a start-up step failed, in reverse order, without the
    shutdown steps (nothing was served: no "shutting_down", no grace)."""
    watchdog.arm(HURRY_SECONDS, "start-up failed and stopping did not finish")
    try:
        await app.cleanup()
    except Exception:  # the start-up failure is the line that matters
        log.debug("startup_cleanup_failed", exc_info=True)


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is left, then close the loop (its signal handlers go with it)."""
    try:
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())  # the WAL checkpoint's thread
    finally:
        loop.close()
