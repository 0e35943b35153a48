"""Storage: the SQLite connection, migrations, the log writer and the session repository."""

from __future__ import annotations

from .db import connect
from .records import RequestRecord, new_id
from .writer import LogWriter, Redactor

__all__ = ["LogWriter", "Redactor", "RequestRecord", "connect", "new_id"]
