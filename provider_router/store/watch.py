"""Watching the log database while the daemon runs: whether records are being written,
whether the file at the configured path is still the one the daemon opened (and reopening
it when not), and keeping the WAL short.

It reads only the log writer's public counters (`written`, `failed`, `dropped`, `depth`);
the app owns the resources and passes `reopen`, which restarts them on the path.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable
from urllib.parse import quote

import structlog

from ..records import iso

log = structlog.get_logger("provider_router.watch")

# Records waiting while nothing commits for this long: the writer is stuck (a lock held).
STALL_SECONDS = 2.0
# Repeated write failures: one warning per this many seconds, with the counts.
WARN_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class FileId:
    """What names a file whatever its path: device and inode."""

    dev: int
    ino: int

    @classmethod
    def of(cls, path: str) -> FileId | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return cls(st.st_dev, st.st_ino)


class Writes:
    """Whether records are being written, sampled each tick: `failing` while the writer's
    `failing_since` is set (its latest reports failed more than they wrote), `stalled` while
    records wait and nothing is committed. Reads only; it never touches the writer."""

    def __init__(self, writer: Any, bound: int) -> None:
        self.writer = writer
        self.bound = bound
        self.state = "ok"
        self.since: float | None = None  # when the current bad state began (wall clock)
        self._seen = (writer.written, writer.failed)
        self._dropped = writer.dropped
        self.dropped_lately = 0  # records dropped (queue full) since the previous sample
        self._moved: float | None = None  # last progress, or last time nothing was waiting
        self._warned = 0.0
        self._warned_failed = writer.failed

    def sample(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        written, failed = self.writer.written, self.writer.failed
        dw, df = written - self._seen[0], failed - self._seen[1]
        self._seen = (written, failed)
        self.dropped_lately, self._dropped = self.writer.dropped - self._dropped, self.writer.dropped
        if self._moved is None or dw or df or self.writer.depth == 0:
            self._moved = now
        idle = now - self._moved
        if self.writer.failing_since is not None:
            self._enter("failing")
        elif idle >= STALL_SECONDS:
            self._enter("stalled")
        else:
            self._enter("ok")
        if self.state == "failing" and failed > self._warned_failed and now - self._warned >= WARN_SECONDS:
            log.warning(
                "log_writes_failing", failed=failed - self._warned_failed, failed_total=failed, written_total=written,
                since=iso(self.since or time.time()), hint="see /health; disk full or database locked?",
            )  # fmt: skip
            self._warned, self._warned_failed = now, failed

    def _enter(self, state: str) -> None:
        if state == self.state:
            return
        if state == "ok":
            log.info("log_writes_resumed", after=self.state, written_total=self.writer.written, failed_total=self.writer.failed)
            self.since = None
        else:
            self.since = time.time()
            if state == "stalled":
                log.warning("log_writer_stalled", waiting=self.writer.depth, hint="is the database locked by another process, or not answering?")
        self.state = state

    def reason(self) -> str | None:
        if self.state == "failing":
            return f"log records are failing to be written since {iso(self.since or time.time())}"
        if self.state == "stalled":
            return f"the log writer has committed nothing for {STALL_SECONDS:g}s with {self.writer.depth} waiting"
        if self.dropped_lately:
            return f"the log queue is full: records are being dropped ({self.dropped_lately} in the last check)"
        if self.writer.depth >= self.bound:
            return f"the log queue is full ({self.writer.depth} records): new requests wait for room"
        return None


class LogWatch:
    """The periodic check of the log, whatever the database: `run()` as a task owned by the
    app samples the writes each `interval` (and does `tick`'s work); `reasons` and `summary`
    are what /health and /metrics show. On PostgreSQL this is all there is: a server that
    stops answering shows as records waiting with nothing committed (`stalled`)."""

    def __init__(self, writer: Any, *, bound: int, interval: float = 1.0) -> None:
        self.writer = writer
        self.writes = Writes(writer, bound)
        self.interval = interval
        self.lost = 0  # records committed where nobody will read them (DbWatch: a moved file)

    async def tick(self) -> None:
        """A subclass's own check, after each sample."""

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.writes.sample()
                await self.tick()
            except Exception:  # a bug here must not end the watching for good
                log.exception("database_watch_failed")

    def reasons(self) -> list[str]:
        reason = self.writes.reason()
        return [] if reason is None else [reason]

    def summary(self) -> dict[str, Any]:
        w = self.writer
        return {
            "state": self.writes.state,
            "written": w.written,
            "failed": w.failed + self.lost,
            "dropped": w.dropped,
            "queue_depth": w.depth,
            "queue_bound": self.writes.bound,
        }


class DbWatch(LogWatch):
    """A SQLite file's watch: besides the writes, each `interval` it compares the file at
    `path` with the one opened; on a change it logs an error and calls `reopen` (retrying
    each tick until it succeeds). Every `checkpoint` seconds it truncates the WAL if no
    reader holds it back."""

    def __init__(
        self,
        path: str,
        writer: Any,
        *,
        bound: int,
        reopen: Callable[[], Awaitable[None]],
        interval: float = 1.0,
        checkpoint: float = 60.0,
    ) -> None:
        super().__init__(writer, bound=bound, interval=interval)
        self.path = path
        self._reopen = reopen
        self.checkpoint_every = checkpoint
        self._next_checkpoint = time.monotonic() + checkpoint
        self.opened = FileId.of(path)
        self._companions = self._side_files()  # its -wal and -shm, as last seen with it
        self.file = "ok"  # ok | removed | replaced
        self.reopened = 0
        self._written_ok = writer.written

    # -- the file ---------------------------------------------------------------------------
    def opened_now(self) -> None:
        """The app has (re)opened the path, its writer not yet restarted: this is the file
        to compare with from now on."""
        self._count_lost()
        self.opened = FileId.of(self.path)
        self._companions = self._side_files()
        self.file = "ok"
        self._written_ok = self.writer.written

    def check_file(self) -> str:
        """ok, removed or replaced; counts only records committed while the path was right."""
        written = self.writer.written  # read before the stat: these went to the file seen ok
        try:
            now = FileId.of(self.path)
        except OSError:  # the directory unreadable: nothing known, nothing changed
            return self.file
        if now is not None and now == self.opened:
            self._written_ok = written
            self._companions = self._side_files()
            return "ok"
        return "removed" if now is None else "replaced"

    def _side_files(self) -> dict[str, FileId | None]:
        return {suffix: FileId.of(self.path + suffix) for suffix in ("-wal", "-shm")}

    def set_aside_stale(self) -> None:
        """Called with every connection to the old file closed: its -wal and -shm left at
        the path (SQLite keeps them when the main file moved) must not be paired with the
        new file, which would read the old file's pages from them. The -shm is only an
        index and goes; the -wal, which may hold the old file's last commits, is renamed."""
        for suffix, seen in self._companions.items():
            name = self.path + suffix
            if seen is None or FileId.of(name) != seen:
                continue
            if suffix == "-shm":
                os.unlink(name)
                continue
            aside = f"{name}.orphaned-{time.strftime('%Y%m%dT%H%M%S')}"
            os.replace(name, aside)
            log.warning("database_old_wal_set_aside", db=self.path, moved_to=aside, hint="it belongs to the file that was at the path")

    async def _handle_change(self, change: str) -> None:
        if self.file == "ok":
            log.error(
                "database_file_" + change, db=self.path,
                action="reopening the path; records committed since the last check are counted as lost",
            )  # fmt: skip
        self.file = change
        try:
            await self._reopen()  # stops the writer (what it holds lands in the old file), reopens
        except Exception as e:
            self._count_lost()
            log.error("database_reopen_failed", db=self.path, error=f"{type(e).__name__}: {e}", retry_seconds=self.interval)
            return
        self.reopened += 1
        log.warning("database_reopened", db=self.path, lost=self.lost)

    def _count_lost(self) -> None:
        # The writer is stopped: everything it committed since the path was last seen right
        # went into the old file.
        if self.writer.written > self._written_ok:
            self.lost += self.writer.written - self._written_ok
            self._written_ok = self.writer.written

    # -- the WAL ----------------------------------------------------------------------------
    def truncate_wal(self) -> tuple[int, int, int] | None:
        """`wal_checkpoint(TRUNCATE)` on a connection of its own that waits for nobody:
        (busy, wal pages, checkpointed); busy means a reader or the writer held it back."""
        try:
            conn = sqlite3.connect(f"file:{quote(os.path.abspath(self.path))}?mode=rw", uri=True, timeout=0)
        except sqlite3.Error:
            return None
        try:
            row = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            return (int(row[0]), int(row[1]), int(row[2])) if row else None
        except sqlite3.Error:
            return None
        finally:
            conn.close()

    # -- the task ---------------------------------------------------------------------------
    async def tick(self) -> None:
        change = self.check_file()
        if change != "ok":
            await self._handle_change(change)
        elif time.monotonic() >= self._next_checkpoint:
            self._next_checkpoint = time.monotonic() + self.checkpoint_every
            result = await asyncio.to_thread(self.truncate_wal)
            log.debug("wal_checkpoint", busy=None if result is None else result[0])

    # -- what /health and /metrics show ------------------------------------------------------
    def reasons(self) -> list[str]:
        out = super().reasons()
        if self.file != "ok":
            out.insert(0, f"the database file at the configured path was {self.file}; reopening it")
        return out

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "file": self.file, "reopened": self.reopened}
