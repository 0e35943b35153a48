"""The running daemon's mark next to its database: `<db>.daemon`, locked while it serves.

A daemon keeps active sessions in memory and writes them back on their next request, so
a command that edits sessions in the file must know whether a daemon serves it, and where
to ask it instead. The lock says so, not the file: flock dies with its process, so the
file a killed daemon leaves behind reads as free. Instances sharing the database hold it
shared: it then reads as free to the CLI, which may edit the file they all read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def mark_path(db_path: str | Path) -> str:
    # Resolved on both sides: a relative --db or a symlink still names the same mark.
    return os.path.realpath(db_path) + ".daemon"


class Presence:
    """A held mark: the lock lasts as long as the descriptor stays open."""

    def __init__(self, path: str, fd: int) -> None:
        self.path, self.fd = path, fd

    def serve_at(self, url: str | None) -> None:
        """Say where the daemon listens (None until it does: the CLI then says to retry)."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps({"pid": os.getpid(), "url": url}).encode(), 0)

    def release(self) -> None:
        # Unlink while still locked: once closed, a new daemon may lock this very file,
        # and unlinking it then would hide that daemon.
        try:
            if os.path.samestat(os.stat(self.path), os.fstat(self.fd)):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)


def _lock_mark(path: str, mode: int) -> int | None:
    """A descriptor of the mark at `path`, flocked with `mode` (exclusive or shared); None
    if another holder's lock excludes it."""
    import fcntl  # POSIX only: imported here so that the CLI still loads elsewhere

    while True:
        # O_NOFOLLOW: a symlink planted in a shared directory must not be written through.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.path.samestat(os.stat(path), os.fstat(fd)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # we locked a mark its daemon unlinked as it stopped: take a fresh one


def hold(db_path: str | Path) -> Presence | None:
    """Mark `db_path` as served by this process (its address follows with `Presence.serve_at`);
    None if another daemon holds it."""
    import fcntl

    path = mark_path(db_path)
    fd = _lock_mark(path, fcntl.LOCK_EX)
    if fd is None:
        return None
    mark = Presence(path, fd)
    mark.serve_at(None)
    return mark


class SharedPresence:
    """A mark held shared by one of several instances serving a database together: their
    sessions live in the database, so the CLI edits the file itself; a daemon alone on it
    (which holds the mark exclusively) cannot start meanwhile, nor these while one runs."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def serve_at(self, url: str | None) -> None:
        pass  # nothing to ask: the CLI edits the file, and every instance reads it

    def release(self) -> None:
        os.close(self.fd)  # never unlinked: other instances hold the same file


def hold_shared(db_path: str | Path) -> SharedPresence | None:
    """Mark `db_path` as served by this instance among others; None if a daemon alone serves it."""
    import fcntl

    fd = _lock_mark(mark_path(db_path), fcntl.LOCK_SH)
    return None if fd is None else SharedPresence(fd)


def serving(db_path: str | Path) -> dict[str, Any] | None:
    """`{"pid", "url", "uid"}` of the live daemon serving `db_path`, else None. A mark held
    but not readable yet (the daemon is writing it) gives None values: a daemon is there all
    the same. `uid` owns the mark: a caller sends that address secrets only if it is its own."""
    import fcntl

    path = mark_path(db_path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except PermissionError:  # another user's mark: whether a daemon holds it is unknown
        try:
            owner: int | None = os.stat(path).st_uid
        except OSError:
            owner = None
        return {"pid": None, "url": None, "uid": owner}
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None  # free: no mark, or a killed daemon's
        except BlockingIOError:
            pass
        try:
            data = json.loads(os.pread(fd, 4096, 0))
        except ValueError:
            data = None
        data = data if isinstance(data, dict) else {}
        pid, url = data.get("pid"), data.get("url")
        return {
            "pid": pid if isinstance(pid, int) else None,
            "url": url if isinstance(url, str) else None,
            "uid": os.fstat(fd).st_uid,
        }
    finally:
        os.close(fd)
