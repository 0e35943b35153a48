"""Retention: deleting requests older than a cut-off, then what no request points at any
more (sessions, messages, blobs), in batches with progress; and VACUUM."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Callable

import aiosqlite
import orjson

from ..history import message_text
from .queries import fetch_all, has_table


@dataclass(slots=True)
class PruneResult:
    cutoff: str
    requests: int = 0
    sessions: int = 0
    messages: int = 0
    blobs: int = 0


async def _one_batch(conn: aiosqlite.Connection, sql: str, params: tuple[Any, ...]) -> int:
    await conn.execute("BEGIN IMMEDIATE")
    try:
        cur = await conn.execute(sql, params)
        n = cur.rowcount
        await conn.commit()
    except BaseException:
        await conn.rollback()
        raise
    return n


async def _referenced(conn: aiosqlite.Connection, mid: int) -> bool:
    for sql in (
        "SELECT 1 FROM messages WHERE parent_id = ? LIMIT 1",
        "SELECT 1 FROM requests WHERE tip_message = ? LIMIT 1",
        "SELECT 1 FROM requests WHERE reply_message = ? LIMIT 1",
        "SELECT 1 FROM requests WHERE prompt_message = ? LIMIT 1",
        # The replies of choices after the first (n > 1): few rows, behind a partial index.
        "SELECT 1 FROM requests WHERE replies IS NOT NULL AND ?1 IN (SELECT value FROM json_each(replies)) LIMIT 1",
        "SELECT 1 FROM turns WHERE message_hash = (SELECT hash FROM messages WHERE id = ?) LIMIT 1",
    ):
        async with conn.execute(sql, (mid,)) as cur:
            if await cur.fetchone() is not None:
                return True
    return False


async def _prune_batch(conn: aiosqlite.Connection, older_than: str, batch: int, result: PruneResult) -> int:
    """Delete up to `batch` requests received before `older_than`, then the messages and
    blobs only they used, in one transaction; returns how many requests."""
    await conn.execute("BEGIN IMMEDIATE")
    try:
        rows = await fetch_all(
            conn,
            "SELECT rowid, tip_message, prompt_message, reply_message, replies, params_blobs, body_blob "
            "FROM requests WHERE received_at < ? ORDER BY rowid LIMIT ?",
            (older_than, batch),
        )
        if not rows:
            await conn.commit()
            return 0
        await conn.executemany("DELETE FROM requests WHERE rowid = ?", [(r["rowid"],) for r in rows])
        blobs: dict[int, int] = {}
        nodes: set[int] = set()
        for r in rows:
            nodes.update(x for x in (r["tip_message"], r["prompt_message"], r["reply_message"]) if x)
            nodes.update(x for x in (orjson.loads(r["replies"]) if r["replies"] else ()) if x)
            ids = list(orjson.loads(r["params_blobs"]).values()) if r["params_blobs"] else []
            for b in ids + ([r["body_blob"]] if r["body_blob"] else []):
                blobs[b] = blobs.get(b, 0) + 1
        await conn.executemany("UPDATE blobs SET refs = refs - ? WHERE id = ?", [(n, b) for b, n in blobs.items()])
        cur = await conn.executemany("DELETE FROM blobs WHERE id = ? AND refs <= 0", [(b,) for b in blobs])
        result.blobs += max(cur.rowcount, 0)
        # Walk up from each node the deleted rows used: a node nothing refers to any more
        # (no request, no child, no turn) goes, and then its parent is looked at.
        todo = sorted(nodes, reverse=True)
        while todo:
            mid = todo.pop()
            if await _referenced(conn, mid):
                continue
            async with conn.execute("SELECT parent_id, body FROM messages WHERE id = ?", (mid,)) as c:
                found = await c.fetchone()
            if found is None:
                continue
            await conn.execute("DELETE FROM messages WHERE id = ?", (mid,))
            await conn.execute(
                "INSERT INTO messages_fts (messages_fts, rowid, text) VALUES ('delete', ?, ?)",
                (mid, message_text(orjson.loads(found[1]))),
            )
            result.messages += 1
            if found[0] is not None:
                todo.append(found[0])
        await conn.commit()
    except BaseException:
        await conn.rollback()
        raise
    return len(rows)


async def prune(
    conn: aiosqlite.Connection,
    older_than: str,
    *,
    batch: int = 2000,
    pause: float = 0.05,
    progress: Callable[[str, int], None] | None = None,
) -> PruneResult:
    """Delete requests received before `older_than` (and the messages and blobs nothing
    else uses), and expired sessions last used before it (their turns by cascade; the
    connection needs `PRAGMA foreign_keys=ON`). Bounded batches, one short transaction
    each: a running daemon's writer waits at most one batch, never the whole prune."""
    result = PruneResult(older_than)
    while True:
        n = await _prune_batch(conn, older_than, batch, result)
        result.requests += n
        if progress is not None and n:
            progress("requests", result.requests)
        if n < batch:
            break
        await asyncio.sleep(pause)  # a gap, so a writer sleeping in its busy handler gets the lock
    if await has_table(conn, "sessions"):
        while True:
            n = await _one_batch(
                conn,
                "DELETE FROM sessions WHERE rowid IN (SELECT rowid FROM sessions "
                "WHERE state = 'expired' AND last_accessed_at < ? LIMIT ?)",
                (older_than, batch),
            )
            result.sessions += n
            if progress is not None and n:
                progress("sessions", result.sessions)
            if n < batch:
                break
            await asyncio.sleep(pause)
    return result


async def vacuum(conn: aiosqlite.Connection) -> tuple[int, int, int]:
    """VACUUM, then move the WAL into the main file and truncate it.

    Returns `wal_checkpoint`'s (busy, wal pages, pages checkpointed); busy=1 means a reader
    (the daemon) kept part of the WAL alive.
    """
    await conn.execute("VACUUM")
    async with conn.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cur:
        busy, log, done = await cur.fetchone()  # type: ignore[misc]
    return busy, log, done
