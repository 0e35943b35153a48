"""What the running app owns, in one typed object stored on the aiohttp app.

Handlers reach it as `request.app[STATE]`; `app.py` fills it in `cleanup_ctx`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .config import Config
from .providers import Provider
from .routing import Router

if TYPE_CHECKING:
    from .metrics import Metrics
    from .store import LogWriter, Redactor
    from .store.locks import Coordination
    from .store.reads import LogReads
    from .store.sessions import SessionStore
    from .store.watch import LogWatch
    from .sessions import Sessions
    from .threads import Threads


@dataclass(slots=True)
class State:
    config: Config
    router: Router
    db_path: str
    redactor: Redactor
    client_keys: dict[str, str] = field(default_factory=dict)  # sha256(key) -> name
    shared: bool = False  # other instances serve the same database (`serve --workers N`, `--shared`)
    worker: tuple[int, int] | None = None  # (this worker's number from 1, how many) under `serve --workers N`
    coord: Coordination | None = None  # locks and leader: of this process, or shared with the other instances
    providers: dict[str, Provider] = field(default_factory=dict)
    reads: LogReads | None = None  # the inspection reads (admin API, sessions API, dashboard): a read-only SQLite connection, or a pool
    writer: LogWriter | None = None
    session_store: SessionStore | None = None  # sessions as stored (SQLite or PostgreSQL)
    watch: LogWatch | None = None  # the log's health (and a SQLite file's identity: store/watch.py)
    sessions: Sessions | None = None
    threads: Threads | None = None
    metrics: Metrics | None = None
    shutting_down: bool = False  # set by on_shutdown, before in-flight requests get their grace
    ending: bool = False  # the grace ran out: the app is cancelling its in-flight requests
    inflight: set[asyncio.Task[Any]] = field(default_factory=set)


STATE = web.AppKey("state", State)
# Per-request storage: the request id, and the log record the handlers fill.
REQUEST_ID = web.RequestKey("request_id", str)
RECORD = web.RequestKey("record", "RequestRecord")
# A streamed response whose head went out: nothing else may be sent for its request.
STARTED = web.RequestKey("started", web.StreamResponse)
