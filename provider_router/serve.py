"""Running the daemon: the event loop, the listening socket, start-up and shutdown; and
`serve --workers N`, a parent that runs N daemons sharing one port and one database.

A signal (see `stopping.py`) closes the listener, in-flight requests get
`server.shutdown_grace_seconds`, then the app's cleanup flushes the log. A start-up failure
is one `startup_failed` line and exit status 1 (see `startup.py`).

With N workers the parent starts them (each `serve --shared`, listening with SO_REUSEPORT,
its own log writer process), forwards the signals it gets, restarts a worker that dies,
and exits once all have stopped. A worker whose parent died stops as if signalled.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import structlog
from aiohttp import web, web_protocol
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from .app import create_app, end_grace
from .config import Config
from .startup import StartupError, database_error, listen_error
from .state import STATE
from .stopping import HURRY_SECONDS, SIGNALS, Signals, Watchdog
from . import location
from .store.presence import Presence, SharedPresence, hold, hold_shared, serving

log = structlog.get_logger("provider_router")


class _Handler(web_protocol.RequestHandler):
    """aiohttp's connection handler, but a request head it cannot parse (a line too long, a
    malformed header) is answered without quoting it, and logged as one warning line.
    aiohttp's answer repeats the offending bytes, which may be a client's key (an
    `Authorization` header too long), and logs it as an error with a traceback, for what
    is the client's mistake."""

    __slots__ = ()

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if isinstance(exc, HttpProcessingError) and status < 500:
            what = "a line of the request head (its URL or a header) is too long" if isinstance(exc, LineTooLong) else "the request head is malformed"
            message = f"{status} Bad Request: {what}."
        return super().handle_error(request, status, exc, message)

    def log_exception(self, *args: object, **kw: object) -> None:
        exc = kw.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            log.warning("bad_http_request", error=type(exc).__name__, status=exc.code)  # not its message: it quotes the bytes
            return
        super().log_exception(*args, **kw)


class _Runner(web.AppRunner):
    """The app's runner, its connections handled by `_Handler`."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server
        return server


class _Server(web.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        handler = super().__call__()
        handler.__class__ = _Handler  # the same slots: only the two methods above differ
        return handler


# Connections the kernel holds for us before we accept them (capped by net.core.somaxconn).
# aiohttp's default, 128, is overrun by an agent or a benchmark opening hundreds at once: the
# kernel then drops the handshakes past it and the clients retry a second later (1,000
# streams opened at once waited about 1 s each for their first byte; bench/README.md).
LISTEN_BACKLOG = 2048


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


Mark = Presence | SharedPresence


def _hold_mark(db: str, shared: bool) -> Mark | OSError | None:
    """The `<db>.daemon` mark (held shared by instances sharing the database); an OSError if
    it could not be made (said once the daemon listens: a directory that refuses the mark
    usually refuses the database too, and then that is the one line to show), or None if
    another daemon holds it (said here)."""
    try:
        mark: Mark | None = hold_shared(db) if shared else hold(db)
    except OSError as e:
        return e
    if mark is None:
        other = serving(db) or {}
        if shared:
            hint = "a daemon alone serves this database: stop it, or pass --db for another one"
        elif other.get("pid") is None:  # instances sharing it hold the mark, and say nothing in it
            hint = "instances sharing this database (serve --workers / --shared) serve it: start this one with --shared, or pass --db"
        else:
            hint = "another daemon serves this database: stop it, or pass --db for another one"
        log.error("database_in_use", db=db, other_pid=other.get("pid"), other_url=other.get("url"), hint=hint)
        return None
    return mark


@dataclass(frozen=True)
class Worker:
    """One of `serve --workers N`'s daemons: its number (from 1) of `count`, the pipe end on
    which it says it listens, and the one that ends when its parent does."""

    number: int
    count: int
    ready_fd: int
    life_fd: int

    @classmethod
    def parse(cls, spec: str) -> Worker:
        number, count, ready, life = (int(x) for x in spec.split(":"))
        return cls(number, count, ready, life)

    def spec(self) -> str:
        return f"{self.number}:{self.count}:{self.ready_fd}:{self.life_fd}"


def run(
    cfg: Config, *, db_path: str | None = None, traceback: bool = False, shared: bool = False, worker: Worker | None = None
) -> int:
    """Serve until SIGTERM/SIGINT/SIGHUP; the exit status. `traceback`: start-up failures
    log their traceback too (`--log-level debug`). `shared`: other instances serve the same
    database (and may share the port); `worker`: one of `serve --workers N`'s."""
    db = db_path or cfg.database.location
    postgres = location.is_postgres(db)
    shared = shared or worker is not None or postgres  # any instance may join a PostgreSQL database
    if worker is not None:
        structlog.contextvars.bind_contextvars(worker=worker.number)
    watchdog = Watchdog()
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    signals = Signals(cfg.server.shutdown_grace_seconds, watchdog)
    signals.install(loop)  # from here on no signal kills it mid-start: it stops after starting
    if worker is not None:
        _watch_parent(loop, worker.life_fd, signals)
    mark: Mark | OSError | None = None
    try:
        if not postgres:  # a PostgreSQL database has no file next to it, nor a daemon of its own
            try:
                # Before the app loads sessions: another daemon on this database would write its own
                # copies of them over ours, and a CLI edit must know whom to ask from the start.
                Path(db).parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise database_error(e, db) from e
            mark = _hold_mark(db, shared)
            if mark is None:
                return 1
        return loop.run_until_complete(_serve(cfg, db, mark, signals, watchdog, shared, worker))
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
        if isinstance(mark, (Presence, SharedPresence)):  # released once the log is flushed: till then sessions may be written
            mark.release()


def _watch_parent(loop: asyncio.AbstractEventLoop, fd: int, signals: Signals) -> None:
    """A worker whose parent died (killed, say: it had no chance to signal) stops as if
    signalled: the parent holds the other end of `fd` and never writes to it."""

    def readable() -> None:
        if os.read(fd, 64):
            return
        loop.remove_reader(fd)
        signals.parent_gone()

    loop.add_reader(fd, readable)


async def _serve(
    cfg: Config, db: str, mark: Mark | OSError | None, signals: Signals, watchdog: Watchdog, shared: bool, worker: Worker | None
) -> int:
    app = create_app(cfg, db_path=db, shared=shared, worker=(worker.number, worker.count) if worker else None)
    app.on_startup.append(_settle_heap)  # after the app's own start-up (cleanup_ctx runs first)
    signals.hurry = lambda: end_grace(app)
    host, port = cfg.server.host, cfg.server.port
    runner = _Runner(
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
        # Instances sharing the database may share the port too: the kernel spreads the
        # connections among them.
        site = web.TCPSite(runner, host, port, reuse_port=shared or None, backlog=LISTEN_BACKLOG)
        await site.start()
    except OSError as e:
        await _undo_start(app, watchdog)
        raise listen_error(e, host, port) from e
    # "listening" means ready; from then on the mark tells the CLI where to send session edits.
    bound = runner.addresses[0][1] if runner.addresses else port
    if isinstance(mark, OSError):
        log.warning("daemon_mark_failed", db=db, error=str(mark), hint="session edits from the CLI will not find this daemon")
    elif mark is not None:
        mark.serve_at(local_url(host, bound))
    log.info("listening", url=f"http://{host}:{bound}/v1", db=location.shown(db), models=[m.name for m in app[STATE].router.available])
    if worker is not None:  # the parent waits for this before it says the workers listen
        os.write(worker.ready_fd, b"1")
        os.close(worker.ready_fd)
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


# -- serve --workers N ---------------------------------------------------------------------
# A worker that keeps dying is started again after this long at most (doubling from 1 s).
RESTART_MOST_SECONDS = 30.0
# A worker that ran this long before dying is restarted at once.
RESTART_STEADY_SECONDS = 10.0


class _Child:
    """A running worker, as its parent sees it."""

    def __init__(self, number: int, proc: asyncio.subprocess.Process, started: float) -> None:
        self.number, self.proc, self.started = number, proc, started


def _reserve_port(host: str) -> socket.socket:
    """A port for the workers to share, when none was given (`--port 0`): bound with
    SO_REUSEPORT, never listening, held until they listen on it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock


def run_workers(cfg: Config, count: int, command: Callable[[int], list[str]]) -> int:
    """Run `count` workers on the configured port, each `command(port) + ["--worker", spec]`
    (a `serve --shared` of the same settings), until a signal stops them; the exit status.
    A worker that cannot start stops the others: the first one's own `startup_failed` line
    says why (and its status is ours)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(_supervise(cfg, count, command))
    finally:
        loop.close()


async def _supervise(cfg: Config, count: int, command: Callable[[int], list[str]]) -> int:
    loop = asyncio.get_running_loop()
    host, port = cfg.server.host, cfg.server.port
    held: socket.socket | None = None
    if port == 0:
        try:
            held = _reserve_port(host)
        except OSError as e:
            err = listen_error(e, host, port)
            log.error("startup_failed", what=err.what, where=err.where, hint=err.hint, error=err.error)
            return 1
        port = held.getsockname()[1]
    life_r, life_w = os.pipe()  # ends when this process does: the workers then stop
    stop = asyncio.Event()
    signalled: list[int] = []
    children: dict[int, _Child] = {}

    def received(sig: int) -> None:
        signalled.append(sig)
        name = signal.Signals(sig).name
        log.info("signal_received", signal=name, action="stopping the workers" if len(signalled) == 1 else "passed on to the workers")
        for c in children.values():
            if c.proc.returncode is None:
                c.proc.send_signal(sig)
        stop.set()

    for sig in SIGNALS:
        loop.add_signal_handler(sig, received, sig)

    async def start(number: int) -> _Child | int:
        """Worker `number` listening, or its exit status if it stopped before it did."""
        ready_r, ready_w = os.pipe()
        spec = Worker(number, count, ready_w, life_r).spec()
        proc = await asyncio.create_subprocess_exec(
            *command(port), "--worker", spec, pass_fds=(ready_w, life_r),
            start_new_session=True,  # a terminal's Ctrl-C reaches the parent alone, which passes it on once
        )  # fmt: skip
        os.close(ready_w)
        child = _Child(number, proc, time.monotonic())
        children[number] = child
        if stop.is_set():  # a signal came while it started
            proc.send_signal(signalled[-1])
        ready = loop.create_future()

        def readable() -> None:
            if not ready.done():
                ready.set_result(bool(os.read(ready_r, 16)))  # b"": it exited first

        loop.add_reader(ready_r, readable)
        try:
            listening = await ready
        finally:
            loop.remove_reader(ready_r)
            os.close(ready_r)
        if listening:
            return child
        return await proc.wait()

    try:
        first = await start(1)  # alone first: it migrates the database, and its failure is the one line
        if isinstance(first, int):
            return first or 1
        rest = await asyncio.gather(*(start(n) for n in range(2, count + 1)))
        failed = [n for n, r in zip(range(2, count + 1), rest) if isinstance(r, int)]
        if failed and not stop.is_set():
            log.error(
                "workers_failed", failed=failed, workers=count, hint="see each worker's startup_failed line above; the others are stopped"
            )  # fmt: skip
            received(signal.SIGTERM)
            await _wait_all(children)
            return 1
        if held is not None:
            held.close()
            held = None
        if not stop.is_set():
            log.info("workers_listening", url=f"http://{host}:{port}/v1", workers=count, pids=[c.proc.pid for c in children.values()])
        return await _keep_running(children, stop, start)
    finally:
        if held is not None:
            held.close()
        os.close(life_w)
        os.close(life_r)
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)


async def _keep_running(children: dict[int, _Child], stop: asyncio.Event, start: Callable[[int], object]) -> int:
    """Restart workers that die until `stop`; then wait for all to stop: the exit status
    (the first worker's that was not 0, else 0)."""
    pause = 1.0
    stopping = asyncio.create_task(stop.wait())
    try:
        while not stop.is_set():
            exits = {asyncio.create_task(c.proc.wait()): c for c in children.values()}
            done, _ = await asyncio.wait([stopping, *exits], return_when=asyncio.FIRST_COMPLETED)
            for task in exits:
                task.cancel()
            for task in done:
                c = exits.get(task)
                if c is None or stop.is_set():
                    continue
                if time.monotonic() - c.started >= RESTART_STEADY_SECONDS:
                    wait, pause = 0.0, 1.0
                else:  # it died young: it may die again at once, so not in a tight loop
                    wait, pause = pause, min(pause * 2, RESTART_MOST_SECONDS)
                log.error("worker_exited", worker=c.number, pid=c.proc.pid, returncode=c.proc.returncode, restart_in_seconds=wait)
                del children[c.number]
                try:
                    await asyncio.wait_for(stop.wait(), wait)
                    break  # stopping: not restarted
                except TimeoutError:
                    pass
                again = await start(c.number)  # type: ignore[misc]
                if isinstance(again, _Child):
                    log.info("worker_restarted", worker=c.number, pid=again.proc.pid)
    finally:
        stopping.cancel()
    return await _wait_all(children)


async def _wait_all(children: dict[int, _Child]) -> int:
    status = 0
    for c in sorted(children.values(), key=lambda c: c.number):
        code = await c.proc.wait()
        if code and not status:
            status = code if code > 0 else 1
    log.info("stopped", workers=len(children), returncode=status)
    return status
