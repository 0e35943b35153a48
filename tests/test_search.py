"""Full-text search in the log finds the same newest requests whether its words are rare
(looked up through the index) or common (requests read newest first, checked against the
index by range): the same rows as the plain query, in the same order."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import aiosqlite
import orjson
import pytest

from provider_router.store import queries, search
from provider_router.store.migrations import migrate_file

WORDS = ["alpha", "beta", "gamma", "delta"]


def _fill(path: Path, n: int, seed: int = 7) -> None:
    """`n` requests, each with a prompt and a reply; most prompts say `common`; some
    requests point at an old prompt (a regenerate), some have no reply."""
    import sqlite3

    migrate_file(str(path))
    rng = random.Random(seed)
    db = sqlite3.connect(path)
    mid = 0
    prompts: list[int] = []
    messages, fts, requests = [], [], []
    for i in range(n):
        if prompts and rng.random() < 0.1:
            prompt = rng.choice(prompts)  # an old prompt, regenerated
        else:
            mid += 1
            prompt = mid
            words = ["common" if rng.random() < 0.9 else "uncommon", rng.choice(WORDS)] + (["needle"] if rng.random() < 0.002 else [])
            text = " ".join(words)
            messages.append((mid, mid.to_bytes(8, "big"), None, "user", orjson.dumps({"role": "user", "content": text}).decode()))
            fts.append((mid, text))
            prompts.append(mid)
        reply = None
        if rng.random() < 0.8:
            mid += 1
            reply = mid
            text = f"answer {rng.choice(WORDS)}"
            messages.append((mid, mid.to_bytes(8, "big"), prompt, "assistant", orjson.dumps({"role": "assistant", "content": text}).decode()))
            fts.append((mid, text))
        requests.append((f"r{i:08d}", "2026-12-03T10:00:00.000Z", "POST", "/v1/chat/completions",
                         rng.choice(["m1", "m2"]), rng.choice(["alice", "bob", None]), prompt, prompt, reply))  # fmt: skip
    db.executemany("INSERT INTO messages (id, hash, parent_id, role, body) VALUES (?, ?, ?, ?, ?)", messages)
    db.executemany("INSERT INTO messages_fts (rowid, text) VALUES (?, ?)", fts)
    db.executemany(
        "INSERT INTO requests (id, received_at, method, path, model, client, tip_message, prompt_message, reply_message) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", requests,
    )  # fmt: skip
    db.commit()
    db.close()


async def _direct(conn: aiosqlite.Connection, flt: queries.RequestFilter, limit: int) -> list[str]:
    where, params = flt.where()
    rows = await queries.fetch_all(conn, f"SELECT r.id FROM requests r{where} ORDER BY r.rowid DESC LIMIT ?", [*params, limit])
    return [r["id"] for r in reversed(rows)]


@pytest.fixture(scope="module")
def db(tmp_path_factory: Any) -> Path:
    path = tmp_path_factory.mktemp("search") / "s.db"
    _fill(path, 15_000)
    return path


@pytest.mark.parametrize(
    "flt",
    [
        {"query": "common"},
        {"query": "common alpha"},
        {"query": "answer"},
        {"query": "uncommon"},
        {"query": "needle"},
        {"query": "comm*"},
        {"query": "common", "model": "m2"},
        {"query": "common", "client": "alice"},
        {"query": "answer beta", "model": "m1", "client": "bob"},
        {"query": "common", "before": "r00007000"},
        {"query": "nothing-like-it"},
    ],
)
async def test_search_finds_the_newest_matches_however_common_the_words(db: Path, flt: dict[str, Any]) -> None:
    conn = await aiosqlite.connect(db)
    conn.row_factory = aiosqlite.Row
    try:
        f = queries.RequestFilter(**flt)
        for limit in (1, 20, 300):
            got = [r["id"] for r in (await queries.recent_requests(conn, f, limit)).rows]
            assert got == await _direct(conn, f, limit)
        match = queries.fts_query(flt["query"])
        assert match is not None
        async with conn.execute("SELECT count(*) FROM messages_fts WHERE messages_fts MATCH ?", (match,)) as cur:
            (matching,) = await cur.fetchone()  # type: ignore[misc]
        assert await search.is_common(conn, match) == (matching >= search.COMMON)
        if flt["query"] in ("common", "answer"):
            assert matching >= search.COMMON  # both ways are taken by this module
        if flt["query"] == "needle":
            assert 0 < matching < search.COMMON
    finally:
        await conn.close()
