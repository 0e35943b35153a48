"""What instances sharing one database agree on besides its rows: one turn at a time per
upstream chat (`ChatLocks`), and which instance runs the periodic work (`Leader`).

One daemon alone uses `local()`: asyncio locks, always the leader. Instances sharing a
SQLite file (`serve --workers N`, `serve --shared`) use `shared(db)`: POSIX record locks on
one file next to the database, and an flock for the leader; the kernel drops both when their
process dies, so a killed instance never blocks the others. A PostgreSQL backend would give
the same two interfaces from advisory locks (store/pg/locks.py).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol

Release = Callable[[], None]


class ChatLocks(Protocol):
    """Exclusive locks named by a string (an upstream chat id, a session's founding)."""

    async def acquire(self, key: str, deadline: float) -> Release:
        """The lock for `key` by `deadline` (the running loop's clock), else TimeoutError;
        returns its release."""
        ...

    def waiting(self, key: str) -> int:
        """How many turns of this process hold `key` or wait for it."""
        ...


class Leader(Protocol):
    """Which one of the instances runs expiry, retention and the chat sweep."""

    def lead(self) -> bool:
        """Whether this process leads now (taking the lead if nobody holds it)."""
        ...

    def close(self) -> None: ...


class LocalLocks:
    """One process's locks: waiters queue on an asyncio lock per key."""

    def __init__(self) -> None:
        self._locks: dict[str, list[Any]] = {}  # key -> [Lock, users]

    async def acquire(self, key: str, deadline: float) -> Release:
        entry = self._locks.setdefault(key, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with asyncio.timeout_at(deadline):
                await entry[0].acquire()
        except BaseException:
            self._leave(key, entry)
            raise

        def release() -> None:
            entry[0].release()
            self._leave(key, entry)

        return release

    def _leave(self, key: str, entry: list[Any]) -> None:
        entry[1] -= 1
        if entry[1] == 0:
            del self._locks[key]

    def waiting(self, key: str) -> int:
        entry = self._locks.get(key)
        return 0 if entry is None else int(entry[1])


class SoleLeader:
    """A daemon alone leads."""

    def lead(self) -> bool:
        return True

    def close(self) -> None:
        pass


def _open(path: str) -> int:
    # O_NOFOLLOW: a symlink planted in a shared directory must not be written through.
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


# The key's byte in the lock file: 62 bits of its hash, so two keys never share one.
def _offset(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 2


# A waiter for another process's lock looks again after this, doubling up to the most.
POLL_FIRST_S = 0.002
POLL_MOST_S = 0.05


async def take(
    local: LocalLocks, key: str, deadline: float, attempt: Callable[[float], Awaitable[bool]], unlock: Callable[[], None]
) -> Release:
    """A lock shared with other processes: this process's turns queue on `local` first (one
    poller per key), then `attempt(seconds left)` is tried until it succeeds, pausing
    POLL_FIRST_S between tries, doubling up to POLL_MOST_S; TimeoutError once `deadline`
    (the running loop's clock) has passed. The release calls `unlock`."""
    release_local = await local.acquire(key, deadline)
    loop = asyncio.get_running_loop()
    pause = POLL_FIRST_S
    try:
        while not await attempt(deadline - loop.time()):
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, POLL_MOST_S)
    except BaseException:
        release_local()
        raise

    def release() -> None:
        try:
            unlock()
        finally:
            release_local()

    return release


class FileLocks:
    """Locks shared by the processes on one database: a byte each of `<db>.locks`, locked
    with POSIX record locks (kernel-held, gone with their process). Turns of this process
    queue on a local lock first: record locks belong to a process, not to a task, and one
    poller per key is enough."""

    def __init__(self, path: str) -> None:
        import fcntl  # POSIX only

        self._fcntl = fcntl
        self._fd = _open(path)
        self._local = LocalLocks()

    async def acquire(self, key: str, deadline: float) -> Release:
        fcntl, fd, at = self._fcntl, self._fd, _offset(key)

        async def attempt(_: float) -> bool:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, at, os.SEEK_SET)
                return True
            except OSError as e:  # EAGAIN or EACCES: another process holds it
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                return False

        return await take(self._local, key, deadline, attempt, lambda: fcntl.lockf(fd, fcntl.LOCK_UN, 1, at, os.SEEK_SET))

    def waiting(self, key: str) -> int:
        return self._local.waiting(key)

    def close(self) -> None:
        os.close(self._fd)  # drops every record lock this process still holds on it


class FileLeader:
    """The leader holds an flock on `<db>.leader` until it exits (or dies: the kernel then
    drops it, and the next instance to ask takes the lead)."""

    def __init__(self, path: str) -> None:
        import fcntl

        self._fcntl = fcntl
        self._fd = _open(path)
        self._held = False

    def lead(self) -> bool:
        if not self._held:
            try:
                self._fcntl.flock(self._fd, self._fcntl.LOCK_EX | self._fcntl.LOCK_NB)
                self._held = True
                import structlog  # the daemon's: this module stays light for the CLI

                structlog.get_logger("provider_router").info("leading", runs="session expiry, the chat sweep, retention")
            except BlockingIOError:
                pass
        return self._held

    def close(self) -> None:
        os.close(self._fd)
        self._held = False


@dataclass
class Coordination:
    """How this process coordinates with others on its database: `shared` is False for a
    daemon alone (its memory is the sessions' authority), True when instances share it
    (the database is, and the locks and the leader are the file ones)."""

    shared: bool
    locks: ChatLocks
    leader: Leader
    _close: list[Callable[[], None]] = field(default_factory=list)
    _aclose: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def close(self) -> None:
        for c in self._close:
            c()
        self._close.clear()

    async def aclose(self) -> None:
        """Close it, whatever its kind (PostgreSQL's needs this: its connection is async;
        `close` is enough for the others)."""
        self.close()
        for c in self._aclose:
            await c()
        self._aclose.clear()


def local() -> Coordination:
    return Coordination(False, LocalLocks(), SoleLeader())


def shared(db_path: str) -> Coordination:
    """The coordination of instances sharing the SQLite file `db_path`."""
    base = os.path.realpath(db_path)  # a relative --db or a symlink still names the same files
    locks, leader = FileLocks(base + ".locks"), FileLeader(base + ".leader")
    return Coordination(True, locks, leader, [locks.close, leader.close])
