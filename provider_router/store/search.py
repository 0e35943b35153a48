"""Full-text search for the newest requests whose prompt or reply matches, in time for a
page at millions of requests whether the words are rare or common.

A rare word is looked up the direct way: every message that matches, then the requests
that point at them (through their indexes), newest first. A common word matches too many
messages for that (a million for `file` at 1M requests: seconds), so the requests are
read newest first instead, a chunk at a time with the other filters applied, and each
chunk's messages are checked against the index by rowid range (the index seeks ranges; a
chunk's messages are mostly recent, so they fall in one or a few ranges) until the page is
full. Which way is decided by counting the matches up to `COMMON`, which stops early.
"""

from __future__ import annotations

from typing import Any

import aiosqlite

COMMON = 10_000  # matching messages from which a word counts as common
CHUNK = 2_000  # requests read at a time, growing with each chunk that did not fill the page
GAP = 4_096  # message ids further apart than this are looked up as separate ranges


async def is_common(conn: aiosqlite.Connection, match: str) -> bool:
    sql = "SELECT count(*) FROM (SELECT rowid FROM messages_fts WHERE messages_fts MATCH ? LIMIT ?)"
    async with conn.execute(sql, (match, COMMON)) as cur:
        (n,) = await cur.fetchone()  # type: ignore[misc]
    return int(n) >= COMMON


def _ranges(ids: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in sorted(ids):
        if out and i - out[-1][1] <= GAP:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


async def newest(conn: aiosqlite.Connection, match: str, where: str, params: list[Any], limit: int) -> list[int]:
    """The rowids of the newest `limit` requests matching `where` (over `requests r`, the
    other filters) whose prompt or first reply matches `match`, newest first."""
    found: list[int] = []
    below: int | None = None
    chunk = CHUNK
    while len(found) < limit:
        clause = where + (" AND " if where else " WHERE ") + "r.rowid < ?" if below is not None else where
        args = [*params, below] if below is not None else list(params)
        sql = f"SELECT r.rowid, r.prompt_message, r.reply_message FROM requests r{clause} ORDER BY r.rowid DESC LIMIT ?"
        async with conn.execute(sql, [*args, chunk]) as cur:
            rows = await cur.fetchall()
        if not rows:
            break
        ids = {m for _, p, a in rows for m in (p, a) if m is not None}
        hits: set[int] = set()
        for lo, hi in _ranges(list(ids)):
            sql = "SELECT rowid FROM messages_fts WHERE messages_fts MATCH ? AND rowid BETWEEN ? AND ?"
            async with conn.execute(sql, (match, lo, hi)) as cur:
                hits.update(r[0] for r in await cur.fetchall())
        found += [rowid for rowid, p, a in rows if p in hits or a in hits][: limit - len(found)]
        below = rows[-1][0]
        chunk = min(chunk * 2, 50_000)
    return found
