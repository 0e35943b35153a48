"""Why the daemon could not start, in one line: what failed, where, and what to do.

`serve.py` turns the exceptions of its start-up steps (opening the database, listening)
into a `StartupError`; the traceback is shown only at `--log-level debug`.
"""

from __future__ import annotations

import errno
import os
import socket
import sqlite3
from dataclasses import dataclass

from . import location


@dataclass(eq=False)  # exceptions stay hashable
class StartupError(Exception):
    what: str
    where: str
    hint: str
    error: str = ""

    def __str__(self) -> str:
        return f"{self.what} ({self.where}): {self.hint}"


def _oserror_text(e: OSError) -> str:
    return e.strerror or type(e).__name__


def database_error(e: BaseException, path: str) -> StartupError:
    """The database at `path` could not be created, opened, migrated or written."""
    error = f"{type(e).__name__}: {e}"
    if os.path.isdir(path):
        return StartupError("the log database path is a directory", path, "pass --db with a file name, e.g. --db DIR/provider-router.db", error)
    if isinstance(e, sqlite3.OperationalError):
        text = str(e).lower()
        if "locked" in text or "busy" in text:
            return StartupError(
                "the log database is locked by another process", path,
                "end the other program's transaction (a sqlite3 shell, a backup, a vacuum), or pass --db for another file",
                error,
            )  # fmt: skip
        if "readonly" in text or "read-only" in text or "unable to open" in text or "disk i/o" in text:
            return StartupError(
                "cannot write the log database", path,
                "make the file and its directory writable by this user, or pass --db PATH", error,
            )  # fmt: skip
        if "full" in text:
            return StartupError("no space left for the log database", path, "free some space, or pass --db PATH on another disk", error)
    if isinstance(e, sqlite3.DatabaseError) and ("not a database" in str(e) or "malformed" in str(e)):
        return StartupError(
            "the file is not a SQLite database (or is damaged)", path,
            "move it away or pass --db for another path; `sqlite3 FILE 'pragma integrity_check'` says more", error,
        )  # fmt: skip
    if isinstance(e, OSError):
        where = str(e.filename) if e.filename else path
        if e.errno == errno.ENOSPC:
            return StartupError("no space left for the log database", where, "free some space, or pass --db PATH on another disk", error)
        return StartupError(
            f"cannot create the log database: {_oserror_text(e)}", where,
            "make the directory writable by this user (or create it), or pass --db PATH", error,
        )  # fmt: skip
    return StartupError(
        f"cannot open the log database: {type(e).__name__}", path, "run with --log-level debug for the traceback", error
    )


def postgres_error(e: BaseException, url: str) -> StartupError:
    """The PostgreSQL database at `url` could not be reached, logged into, or migrated
    (said with the URL and the error without its password)."""
    where = location.shown(url)
    error = f"{type(e).__name__}: {location.error_text(url, e)}"
    text = str(e).lower()
    if "password authentication failed" in text or "no password supplied" in text or "authentication failed" in text:
        return StartupError("PostgreSQL refused the login", where, "check the user and password in database.url (or --db)", error)
    if "does not exist" in text and "database" in text:
        return StartupError(
            "the PostgreSQL database does not exist", where, "create it (`createdb NAME`, as a user allowed to), or name another in the URL", error
        )
    if "permission denied" in text:
        return StartupError(
            "the PostgreSQL user may not create the log's tables", where,
            "grant it CREATE on the database (or its schema), or use the database's owner", error,
        )  # fmt: skip
    if any(w in text for w in ("could not translate host name", "name or service not known", "nodename nor servname", "name resolution")):
        return StartupError("the PostgreSQL server's host name does not resolve", where, "check the host in database.url (or --db)", error)
    if "connection" in text or "timeout" in text:
        return StartupError(
            "cannot reach the PostgreSQL server", where, "is it running and listening there? (`pg_isready -d URL` tells)", error
        )
    return StartupError(f"cannot open the PostgreSQL database: {type(e).__name__}", where, "run with --log-level debug for the traceback", error)


def listen_error(e: BaseException, host: str, port: int) -> StartupError:
    """The listening socket at `host`:`port` could not be opened."""
    where = f"{host}:{port}"
    error = f"{type(e).__name__}: {e}"
    if isinstance(e, socket.gaierror):
        return StartupError("the listen address does not resolve", where, "pass --host with an IP address or a known name", error)
    if isinstance(e, OSError):
        if e.errno == errno.EADDRINUSE:
            return StartupError(
                "the port is in use", where,
                f"stop what listens there (`ss -ltnp 'sport = :{port}'` shows it), or pass --port for another one (0 picks a free one)",
                error,
            )  # fmt: skip
        if e.errno == errno.EADDRNOTAVAIL:
            return StartupError(
                "the address is not one of this machine's", where, "pass --host with a local address (default 127.0.0.1)", error
            )
        if e.errno == errno.EACCES:
            return StartupError("not permitted to listen there", where, "use a port above 1023, or run with the needed privilege", error)
        return StartupError(f"cannot listen: {_oserror_text(e)}", where, "check --host and --port", error)
    return StartupError(f"cannot listen: {type(e).__name__}", where, "run with --log-level debug for the traceback", error)
