"""A page of listed request rows and the cursor to poll for newer ones from: what
`reads.LogReads` answers on either database."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# Opaque to callers: SQLite's cursor is a rowid (digits), PostgreSQL's the last row's
# `received_at` and id (pg/reads.py), since rows there have no single write order.
_CURSOR = re.compile(r"^(\d{1,18}|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z/[0-9a-f]{1,40})$")
START = "0"  # the cursor before any row


def is_cursor(text: str) -> bool:
    """Whether `text` has the shape of a cursor one of the backends hands out (a caller
    passing one on from a URL or a header checks it first)."""
    return bool(_CURSOR.match(text))


@dataclass(slots=True)
class Page:
    """Request rows oldest first (listed: the texts of prompt, reply and reasoning), and
    the cursor to ask for rows written after them."""

    rows: list[dict[str, Any]]
    cursor: str
