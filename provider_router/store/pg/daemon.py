"""What the daemon opens on a PostgreSQL database (app.py `_postgres`): the migrations
under their lock, the pool, and the pieces other modules of this package build: reads,
the session store, the coordination of instances, retention. Imported only when the
database is PostgreSQL, so a SQLite daemon never loads psycopg.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import psycopg

from . import migrations
from .locks import coordination
from .pool import open_pool
from .reads import PgReads
from .retention import prune
from .sessions import PgSessionRepo

__all__ = ["Error", "PgReads", "PgSessionRepo", "coordination", "migrate", "open_pool", "prune"]

Error = psycopg.Error

# The pool's own warnings (one per failed connection attempt, about every second while the
# server is down) would flood the daemon's log in another format; the daemon says it
# once, in its own lines (`session_store_unavailable`, `log_writer_stalled`, /health).
logging.getLogger("psycopg.pool").setLevel(logging.ERROR)


async def migrate(url: str, progress: Callable[[str, int, int], None] | None = None) -> list[str]:
    """Apply the pending migrations (once, whichever instance comes first); their names."""
    done = await asyncio.to_thread(migrations.migrate, url)
    if progress is not None and done:
        progress(", ".join(done), len(done), len(done))
    return done
