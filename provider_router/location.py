"""Where the log database is: a SQLite file's path (the embedded default) or a PostgreSQL
URL (`postgresql://user:password@host:port/dbname?...`, libpq's form). One string names
either, in `database.url`/`database.path` and in `--db`; this module tells them apart and
shows a URL without its password (which never reaches an output, a log line or an error).
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

SCHEMES = ("postgresql://", "postgres://")


def is_postgres(location: str) -> bool:
    """Whether `location` is a PostgreSQL URL rather than a SQLite file's path."""
    return location.startswith(SCHEMES)


def password(location: str) -> str | None:
    """The password a PostgreSQL URL carries, if any (for redaction)."""
    if not is_postgres(location):
        return None
    try:
        return urlsplit(location).password
    except ValueError:
        return None


def shown(location: str) -> str:
    """`location` fit to print: a URL's password replaced by `***`."""
    if not is_postgres(location):
        return location
    try:
        parts = urlsplit(location)
        if parts.password is None:
            return location
        netloc = parts.netloc.rsplit("@", 1)
        user = (parts.username or "") + ":***"
        return urlunsplit(parts._replace(netloc=f"{user}@{netloc[-1]}"))
    except ValueError:
        return "postgresql://(unreadable URL)"
