"""Numbered, append-only schema migrations, recorded in the `_migrations` table.

Never edit a released migration: add a new one at the end of `MIGRATIONS`.
"""

from __future__ import annotations

import time

import aiosqlite

M001_REQUESTS = """
CREATE TABLE requests (
    id TEXT PRIMARY KEY,              -- sortable: time-ordered, see records.new_id()
    received_at TEXT NOT NULL,        -- ISO 8601 UTC
    finished_at TEXT,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    client TEXT,                      -- the client key's name, never the key
    user_agent TEXT,
    model TEXT,                       -- what the client asked for
    provider TEXT,
    upstream_model TEXT,
    stream INTEGER,
    request_body TEXT,
    response_body TEXT,               -- full JSON for non-stream responses
    prompt_text TEXT,                 -- the request's last user message, for search
    response_text TEXT,               -- the assembled reply (streams included)
    reasoning_text TEXT,
    finish_reason TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    total_tokens INTEGER,
    chunk_count INTEGER,
    status INTEGER,
    outcome TEXT,                     -- ok | rejected | upstream_error | timeout | client_disconnected
    error TEXT,
    ttfb_ms REAL,
    duration_ms REAL,
    session_id TEXT,
    turn INTEGER,
    chat_id TEXT,
    parent_id TEXT,                   -- the upstream parent this request continued from
    reply_id TEXT,                    -- the upstream id of the reply it got
    attempts TEXT                     -- JSON list of upstream attempts (retries, fallbacks)
);
CREATE INDEX requests_received ON requests(received_at);
CREATE INDEX requests_session ON requests(session_id) WHERE session_id IS NOT NULL;

-- Full-text index over prompt and reply. The writer fills it once per batch
-- (INSERT ... SELECT: ~1.7x cheaper than a per-row trigger); deletes go through the trigger.
CREATE VIRTUAL TABLE requests_fts USING fts5(
    prompt_text, response_text, content='requests', content_rowid='rowid'
);
CREATE TRIGGER requests_ad AFTER DELETE ON requests BEGIN
    INSERT INTO requests_fts(requests_fts, rowid, prompt_text, response_text)
    VALUES ('delete', old.rowid, old.prompt_text, old.response_text);
END;
"""

M002_SESSIONS = """
CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,        -- hash of client, route, system messages + first user message
    client TEXT NOT NULL,             -- client key name, or 'anonymous'
    provider TEXT NOT NULL,
    upstream_model TEXT NOT NULL,
    chat_id TEXT,                     -- upstream chat of the tip (our own id on stateless upstreams)
    parent_id TEXT,                   -- the tip: upstream id of the last completed reply
    state TEXT NOT NULL DEFAULT 'active',   -- active | expired
    created_at TEXT NOT NULL,
    last_accessed_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    message_count INTEGER NOT NULL DEFAULT 0,
    request_count INTEGER NOT NULL DEFAULT 0,
    metadata TEXT                     -- JSON: user agent, client key name, why it ended
);
CREATE INDEX sessions_fingerprint ON sessions(fingerprint, state);
CREATE INDEX sessions_state_expires ON sessions(state, expires_at);

-- The thread tree: one row per completed reply the upstream knows.
CREATE TABLE turns (
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    prefix_hash TEXT NOT NULL,        -- hash of the client's messages up to and including this reply
    parent_hash TEXT,                 -- the turn this one continued from (NULL: first turn of a chat)
    turn INTEGER NOT NULL,            -- assistant replies on the path, this one included
    chat_id TEXT,
    reply_id TEXT,                    -- the upstream id of the reply: the next turn's parent_id
    request_id TEXT,                  -- the requests row that produced it
    created_at TEXT NOT NULL,
    PRIMARY KEY (session_id, prefix_hash)
) WITHOUT ROWID;
"""

# (name, SQL). Append only.
MIGRATIONS: list[tuple[str, str]] = [
    ("001_requests", M001_REQUESTS),
    ("002_sessions", M002_SESSIONS),
]


async def applied(conn: aiosqlite.Connection) -> list[str]:
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    async with conn.execute("SELECT name FROM _migrations ORDER BY name") as cur:
        return [row[0] for row in await cur.fetchall()]


async def migrate(conn: aiosqlite.Connection) -> list[str]:
    """Apply pending migrations, each in its own transaction; return the names applied."""
    done = set(await applied(conn))
    await conn.commit()
    ran: list[str] = []
    for name, sql in MIGRATIONS:
        if name in done:
            continue
        # executescript commits first; wrap the body so a failure leaves nothing half-applied.
        try:
            await conn.executescript(
                f"BEGIN IMMEDIATE;\n{sql}\n"
                f"INSERT INTO _migrations(name, applied_at) VALUES ('{name}', {time.time()});\nCOMMIT;"
            )
        except Exception:
            if conn.in_transaction:
                await conn.rollback()
            if name in set(await applied(conn)):  # another process migrated first
                continue
            raise
        ran.append(name)
    return ran
