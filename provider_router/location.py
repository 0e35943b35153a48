"""Where the log database is: a SQLite file's path (the embedded default) or a PostgreSQL
URL (`postgresql://user:password@host:port/dbname?...`, libpq's form). One string names
either, in `database.url`/`database.path` and in `--db`; this module tells them apart,
refuses what is neither (a URL of another scheme, a libpq `key=value` string: taken for a
path, it would become a directory named after the password), and shows a URL without its
password, wherever the URL carries it (which never reaches an output, a log line or an
error).
"""

from __future__ import annotations

import re
from urllib.parse import unquote

SCHEMES = ("postgresql://", "postgres://")
_QUERY_PASSWORD = re.compile(r"(?<=[?&]password=)[^&#]*")
_KEYWORDS = re.compile(r"^\s*[A-Za-z_]+\s*=")  # libpq's `host=... password=...` form


def is_postgres(location: str) -> bool:
    """Whether `location` is a PostgreSQL URL rather than a SQLite file's path."""
    return location.startswith(SCHEMES)


def refused(location: str) -> str | None:
    """Why `location` is neither a file's path nor a PostgreSQL URL (never quoting it: it
    may carry a password), or None."""
    if is_postgres(location):
        return None
    if "://" in location:
        return "a URL whose scheme is not postgresql:// (or postgres://); give postgresql://user:password@host/dbname, or a file's path"
    if _KEYWORDS.match(location):
        return "a key=value connection string; give it as a postgresql://user:password@host/dbname URL, or a file's path"
    return None


def _split(location: str) -> tuple[str, str, str] | None:
    """(scheme, user info, the rest) of a URL with user info: up to its last `@`, so a
    password with an unencoded `@`, `:` or `/` is still all of it."""
    scheme = next((s for s in SCHEMES if location.startswith(s)), None)
    if scheme is None:
        return None
    rest = location[len(scheme) :]
    at = rest.rfind("@")
    if at < 0:
        return None
    return scheme, rest[:at], rest[at + 1 :]


def secrets(location: str) -> list[str]:
    """Every form of the password a PostgreSQL URL carries (in its user info or as
    `?password=`), as written and decoded: for redaction."""
    if not is_postgres(location):
        return []
    found = []
    parts = _split(location)
    if parts is not None and ":" in parts[1]:
        found.append(parts[1].split(":", 1)[1])
    found += _QUERY_PASSWORD.findall(location)
    return [s for raw in found if raw for s in dict.fromkeys((raw, unquote(raw)))]


def password(location: str) -> str | None:
    """The password a PostgreSQL URL carries, if any."""
    found = secrets(location)
    return found[0] if found else None


def shown(location: str) -> str:
    """`location` fit to print: a URL's password replaced by `***`."""
    if not is_postgres(location):
        return location
    parts = _split(location)
    if parts is not None and ":" in parts[1]:
        scheme, info, rest = parts
        location = f"{scheme}{info.split(':', 1)[0]}:***@{rest}"
    return _QUERY_PASSWORD.sub("***", location)


def error_text(location: str, e: BaseException) -> str:
    """An error's first line, with the password of `location` taken out wherever it
    appears (a driver may quote its connection string)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    for secret in secrets(location):
        text = text.replace(secret, "***")
    return text
