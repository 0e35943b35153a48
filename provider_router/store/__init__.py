"""Storage: the SQLite connection, migrations, the log writer and the session repository.

Names are imported on first use: the log writer process imports modules of this package
and should not pay for the daemon's side of it (structlog, asyncio) on start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .db import connect
    from ..records import RequestRecord, new_id
    from ..redact import Redactor
    from .writer import LogWriter

__all__ = ["LogWriter", "Redactor", "RequestRecord", "connect", "new_id"]
_HOME = {"connect": ".store.db", "RequestRecord": ".records", "new_id": ".records", "Redactor": ".redact", "LogWriter": ".store.writer"}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(name)
    from importlib import import_module

    return getattr(import_module(_HOME[name], "provider_router"), name)
