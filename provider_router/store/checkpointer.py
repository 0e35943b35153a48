"""Copying the WAL back into the database file beside the log writer, not inside it.

SQLite's automatic checkpoint runs inside the COMMIT that crosses its threshold (1,000
pages): the committing connection copies the WAL's pages into the database file and syncs
it while the writer waits. On agent-shaped traffic (histories growing to 60 KB) that was
most of a commit's cost and over a third of the writer's time (bench/README.md). So the
writer's connection turns it off (`wal_autocheckpoint=0`) and tells this thread when it
has committed; the thread runs a PASSIVE checkpoint on a connection of its own, at most
every `PERIOD_S`. SQLite releases the GIL while it copies and syncs, so the writer goes on
building and committing meanwhile, and a passive checkpoint waits for no reader or writer.
The WAL restarts from its beginning with the first transaction after a complete one, as
before; the daemon's periodic `wal_checkpoint(TRUNCATE)` (`watch.py`) still trims the file.
"""

from __future__ import annotations

import sqlite3
import threading
from typing import Callable

PERIOD_S = 0.25


class Checkpointer:
    def __init__(self, connect: Callable[[], sqlite3.Connection], period_s: float = PERIOD_S) -> None:
        self._connect = connect
        self._period = period_s
        self._due = threading.Event()  # something was committed since the last checkpoint
        self._stopping = threading.Event()
        self.runs = 0
        self.error: BaseException | None = None  # the last failure (the next commit tries again)
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)

    def start(self) -> "Checkpointer":
        self._thread.start()
        return self

    def committed(self) -> None:
        self._due.set()

    def stop(self) -> None:
        """A last checkpoint of what was committed, then the thread ends."""
        self._stopping.set()
        self._due.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            conn = self._connect()
        except sqlite3.Error as e:  # the writer's own connection says what is wrong
            self.error = e
            return
        try:
            while True:
                self._due.wait()
                self._due.clear()
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.runs += 1
                except sqlite3.Error as e:  # a TRUNCATE elsewhere holds it, a full disk: next time
                    self.error = e
                if self._stopping.is_set():
                    return
                self._stopping.wait(self._period)  # at most one per period, however often told
        finally:
            conn.close()
