"""Numbered, append-only schema migrations, recorded in the `_migrations` table.

Never edit a released migration: add a new one at the end of `MIGRATIONS`.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Callable

import aiosqlite

# Called with (what, done, total) during long steps.
Progress = Callable[[str, int, int], None]

# The first columns of every version of the requests table: the texts of released steps
# below are exactly what they were.
_REQUEST_HEAD = """\
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
"""

M001_REQUESTS = """
CREATE TABLE requests (
""" + _REQUEST_HEAD + """\
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

M003_TREE = """
-- Every message once per position in a conversation tree: `hash` is the chained key of
-- history.node_key (its parent's key and its canonical form); `body` its JSON as first seen.
CREATE TABLE messages (
    id INTEGER PRIMARY KEY,
    hash BLOB NOT NULL UNIQUE,
    parent_id INTEGER,                -- NULL: the first message of a conversation
    role TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX messages_parent ON messages(parent_id);
-- Full-text index over each message's text (and its tool calls), once per message; terms
-- only, no positions (detail=none): a third of the size and of the cost of writing it.
CREATE VIRTUAL TABLE messages_fts USING fts5(text, content='', detail=none);

-- Large request fields (tools, response_format, schemas) stored once by content hash;
-- `refs` counts the requests that use them, so retention can remove the unused.
CREATE TABLE blobs (
    id INTEGER PRIMARY KEY,
    hash BLOB NOT NULL UNIQUE,
    data TEXT NOT NULL,
    refs INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE requests_v3 (
""" + _REQUEST_HEAD + """\
    status INTEGER,
    outcome TEXT,                     -- ok | rejected | upstream_error | timeout | client_disconnected | shutdown
    error TEXT,
    finish_reason TEXT,               -- of the first choice
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    total_tokens INTEGER,
    cached_tokens INTEGER,
    chunk_count INTEGER,
    ttfb_ms REAL,
    duration_ms REAL,
    session_id TEXT,
    turn INTEGER,                     -- 1 + the assistant messages in the history it sent
    chat_id TEXT,                     -- threaded upstreams: the upstream chat
    parent_id TEXT,                   -- ... the upstream parent this request continued from
    reply_id TEXT,                    -- the upstream id of the reply it got
    tip_message INTEGER,              -- messages.id: the last message of the history it sent
    prompt_message INTEGER,           -- messages.id: its last user message
    reply_message INTEGER,            -- messages.id: the reply of the first choice
    replies TEXT,                     -- JSON list of every choice's reply message, when n > 1
    params TEXT,                      -- the request body's other fields, as JSON
    params_blobs TEXT,                -- JSON: field -> blobs.id, for the large ones
    overrides TEXT,                   -- JSON: message index -> the message as sent, where it
                                      -- differs from its node's stored body
    body_blob INTEGER,                -- blobs.id: a body that is not a chat request, kept whole
    response TEXT,                    -- the response (for streams: assembled) without the
                                      -- choices' messages, which are the reply nodes
    cut TEXT,                         -- what was stored cut, if anything
    attempts TEXT                     -- JSON list of upstream attempts (retries, fallbacks)
);

-- Roll-ups of the requests, written with them, by minute, hour and day (`span` m, h, d;
-- `at` the period's start, YYYY-MM-DDTHH:MM, YYYY-MM-DDTHH, YYYY-MM-DD, UTC): stats over any
-- range read the days it covers whole, then hours, then minutes, never the requests.
CREATE TABLE rollups (
    span TEXT NOT NULL,
    at TEXT NOT NULL,
    model TEXT NOT NULL,
    provider TEXT NOT NULL,
    outcome TEXT NOT NULL,
    client TEXT NOT NULL,
    requests INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    ttfb_count INTEGER NOT NULL,
    ttfb_sum REAL NOT NULL,
    duration_sum REAL NOT NULL,
    t0 INTEGER NOT NULL, t1 INTEGER NOT NULL, t2 INTEGER NOT NULL, t3 INTEGER NOT NULL,
    t4 INTEGER NOT NULL, t5 INTEGER NOT NULL, t6 INTEGER NOT NULL, t7 INTEGER NOT NULL,
    t8 INTEGER NOT NULL, t9 INTEGER NOT NULL, t10 INTEGER NOT NULL, t11 INTEGER NOT NULL,
    t12 INTEGER NOT NULL, t13 INTEGER NOT NULL,
    d0 INTEGER NOT NULL, d1 INTEGER NOT NULL, d2 INTEGER NOT NULL, d3 INTEGER NOT NULL,
    d4 INTEGER NOT NULL, d5 INTEGER NOT NULL, d6 INTEGER NOT NULL, d7 INTEGER NOT NULL,
    d8 INTEGER NOT NULL, d9 INTEGER NOT NULL, d10 INTEGER NOT NULL, d11 INTEGER NOT NULL,
    d12 INTEGER NOT NULL, d13 INTEGER NOT NULL,
    PRIMARY KEY (span, at, model, provider, outcome, client)
) WITHOUT ROWID;

-- Threaded upstreams' turns: facts about reply nodes of the tree (the upstream's chat and
-- its id for the reply), per session.
CREATE TABLE turns_v3 (
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    message_hash BLOB NOT NULL,       -- messages.hash of the reply
    turn INTEGER NOT NULL,
    chat_id TEXT,
    reply_id TEXT,                    -- the upstream id of the reply: the next turn's parent_id
    request_id TEXT,
    created_at TEXT NOT NULL,
    PRIMARY KEY (session_id, message_hash)
) WITHOUT ROWID;
"""

M003_SWAP = """
DROP TRIGGER IF EXISTS requests_ad;
DROP TABLE requests_fts;
DROP TABLE requests;
ALTER TABLE requests_v3 RENAME TO requests;
DROP TABLE turns;
ALTER TABLE turns_v3 RENAME TO turns;
CREATE INDEX requests_model ON requests(model);
CREATE INDEX requests_provider ON requests(provider);
CREATE INDEX requests_status ON requests(status);
CREATE INDEX requests_outcome ON requests(outcome);
CREATE INDEX requests_client ON requests(client);
CREATE INDEX requests_session ON requests(session_id) WHERE session_id IS NOT NULL;
CREATE INDEX requests_tip ON requests(tip_message);
CREATE INDEX requests_prompt ON requests(prompt_message);
CREATE INDEX requests_reply ON requests(reply_message);
CREATE INDEX requests_replies ON requests(replies) WHERE replies IS NOT NULL;
CREATE INDEX sessions_recent ON sessions(last_accessed_at);
CREATE INDEX turns_message ON turns(message_hash);
-- The request log with its text, for sqlite3 and datasette.
CREATE VIEW request_log AS
SELECT r.*,
    CASE json_type(p.body, '$.content') WHEN 'array' THEN
        (SELECT group_concat(json_extract(value, '$.text'), char(10)) FROM json_each(p.body, '$.content'))
    ELSE json_extract(p.body, '$.content') END AS prompt_text,
    CASE json_type(a.body, '$.content') WHEN 'array' THEN
        (SELECT group_concat(json_extract(value, '$.text'), char(10)) FROM json_each(a.body, '$.content'))
    ELSE json_extract(a.body, '$.content') END AS response_text,
    coalesce(json_extract(a.body, '$.reasoning_content'), json_extract(a.body, '$.reasoning')) AS reasoning_text
FROM requests r
LEFT JOIN messages p ON p.id = r.prompt_message
LEFT JOIN messages a ON a.id = r.reply_message;
"""


def m003_conversation_tree(conn: sqlite3.Connection, progress: Progress | None) -> None:
    """Rebuild the log as the conversation tree: each old request row's bodies become tree
    nodes, blobs and a compact row; threaded turns point at their reply nodes."""
    from .legacy import convert_requests  # the old rows' reading lives with the old shape

    run_script(conn, M003_TREE)
    m004_resent_replies(conn, progress)  # the tree code that converts writes 004's columns
    convert_requests(conn, progress)
    run_script(conn, M003_SWAP)


def m004_resent_replies(conn: sqlite3.Connection, progress: Progress | None) -> None:
    """A reply's node also keeps the form in which requests carry it, once.

    Clients resend a reply without its reply-only fields (`refusal`, `annotations`, ...):
    keeping that form per request made every request of a conversation repeat all its
    earlier replies. The first request to carry a reply decides, once, how requests carry
    it: `resent` when that differs from `body`; `carried` 0 marks a reply no request has
    carried yet. Earlier rows keep their per-request overrides, which stay right."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
    if "resent" not in have:
        conn.execute("ALTER TABLE messages ADD COLUMN resent TEXT")
    if "carried" not in have:
        conn.execute("ALTER TABLE messages ADD COLUMN carried INTEGER NOT NULL DEFAULT 1")


M005_SESSION_LIFECYCLE = """
-- The sessions list's order (most recently used first, id breaking ties), whole, by state
-- or by client: an index walk backwards, not a sort. `sessions_order` covers `sessions_recent`.
CREATE INDEX sessions_order ON sessions(last_accessed_at, id);
CREATE INDEX sessions_state_order ON sessions(state, last_accessed_at, id);
CREATE INDEX sessions_client_order ON sessions(client, last_accessed_at, id);
DROP INDEX IF EXISTS sessions_recent;

-- Lifecycle counters (created, expired, evicted, deleted): each event adds one in the same
-- transaction as the change itself, so they survive restarts, deletes and retention (a
-- counter read from the rows would go down when rows go). Seeded from the rows an earlier
-- release left, which say how each session ended.
CREATE TABLE session_tallies (event TEXT PRIMARY KEY, n INTEGER NOT NULL);
INSERT INTO session_tallies (event, n)
SELECT 'created', count(*) FROM sessions
UNION ALL SELECT 'expired', count(*) FROM sessions WHERE state = 'expired'
    AND coalesce(json_extract(metadata, '$.ended'), 'expired') = 'expired'
UNION ALL SELECT 'evicted', count(*) FROM sessions WHERE state = 'expired' AND json_extract(metadata, '$.ended') = 'evicted'
UNION ALL SELECT 'deleted', 0
-- Ended sessions (expired, evicted, or deleted while active): how many, their durations
-- (first to last request, ms) and requests, for the averages without reading every row.
UNION ALL SELECT 'ended_sessions', count(*) FROM sessions WHERE state = 'expired'
UNION ALL SELECT 'ended_ms', coalesce(sum(CAST((julianday(last_accessed_at) - julianday(created_at)) * 86400000 AS INTEGER)), 0)
    FROM sessions WHERE state = 'expired'
UNION ALL SELECT 'ended_requests', coalesce(sum(request_count), 0) FROM sessions WHERE state = 'expired';

-- Per client: sessions created and ended, kept like the tallies.
CREATE TABLE session_clients (client TEXT PRIMARY KEY, created INTEGER NOT NULL, ended INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO session_clients (client, created, ended)
SELECT coalesce(client, ''), count(*), sum(state = 'expired') FROM sessions GROUP BY coalesce(client, '');

-- The triggers keep both in step with the rows, whoever changes them (the daemon, the CLI,
-- sqlite3): a session ends when its row turns expired or is deleted while active; a revived
-- one is taken back out. Deleting an ended session (retention) changes no figure.
CREATE TRIGGER sessions_counted_new AFTER INSERT ON sessions BEGIN
    INSERT INTO session_clients (client, created, ended) VALUES (coalesce(new.client, ''), 1, new.state = 'expired')
        ON CONFLICT (client) DO UPDATE SET created = created + 1, ended = ended + (new.state = 'expired');
    -- A session that ended before its first write (the daemon coalesces a batch's saves)
    UPDATE session_tallies SET n = n + CASE event WHEN 'ended_sessions' THEN 1 WHEN 'ended_requests' THEN new.request_count
        ELSE CAST((julianday(new.last_accessed_at) - julianday(new.created_at)) * 86400000 AS INTEGER) END
        WHERE event IN ('ended_sessions', 'ended_ms', 'ended_requests') AND new.state = 'expired';
END;
CREATE TRIGGER sessions_counted_ended AFTER UPDATE OF state ON sessions
WHEN old.state = 'active' AND new.state = 'expired' BEGIN
    UPDATE session_tallies SET n = n + CASE event WHEN 'ended_sessions' THEN 1 WHEN 'ended_requests' THEN new.request_count
        ELSE CAST((julianday(new.last_accessed_at) - julianday(new.created_at)) * 86400000 AS INTEGER) END
        WHERE event IN ('ended_sessions', 'ended_ms', 'ended_requests');
    UPDATE session_clients SET ended = ended + 1 WHERE client = coalesce(new.client, '');
END;
CREATE TRIGGER sessions_counted_revived AFTER UPDATE OF state ON sessions
WHEN old.state = 'expired' AND new.state = 'active' BEGIN
    UPDATE session_tallies SET n = n - CASE event WHEN 'ended_sessions' THEN 1 WHEN 'ended_requests' THEN old.request_count
        ELSE CAST((julianday(old.last_accessed_at) - julianday(old.created_at)) * 86400000 AS INTEGER) END
        WHERE event IN ('ended_sessions', 'ended_ms', 'ended_requests');
    UPDATE session_clients SET ended = ended - 1 WHERE client = coalesce(new.client, '');
END;
CREATE TRIGGER sessions_counted_deleted BEFORE DELETE ON sessions WHEN old.state = 'active' BEGIN
    UPDATE session_tallies SET n = n + CASE event WHEN 'ended_sessions' THEN 1 WHEN 'ended_requests' THEN old.request_count
        ELSE CAST((julianday(old.last_accessed_at) - julianday(old.created_at)) * 86400000 AS INTEGER) END
        WHERE event IN ('ended_sessions', 'ended_ms', 'ended_requests');
    UPDATE session_clients SET ended = ended + 1 WHERE client = coalesce(old.client, '');
END;

-- Upstream chats of ended or deleted sessions, each deleted upstream once (where its
-- provider is configured to): `deleted_at` set when done (or the upstream had already
-- forgotten it), `attempts` and `error` while it fails, up to a bound.
CREATE TABLE chat_deletions (
    provider TEXT NOT NULL,
    chat_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    deleted_at TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    PRIMARY KEY (provider, chat_id)
) WITHOUT ROWID;
CREATE INDEX chat_deletions_pending ON chat_deletions(provider) WHERE deleted_at IS NULL;

-- A session's row and turns go when it is deleted (by the daemon, the CLI, retention or by
-- hand): its upstream chats are kept here first, so they can still be deleted. A stateless
-- upstream's chat id is the session's own id: no upstream chat.
CREATE TRIGGER sessions_chats_kept BEFORE DELETE ON sessions BEGIN
    INSERT OR IGNORE INTO chat_deletions (provider, chat_id, session_id)
    SELECT old.provider, chat_id, old.id FROM turns WHERE session_id = old.id AND chat_id IS NOT NULL
    UNION SELECT old.provider, old.chat_id, old.id WHERE old.chat_id IS NOT NULL AND old.chat_id <> old.id;
END;
"""


# (name, SQL or a function of a connection inside the migration's transaction). Append only.
MIGRATIONS: list[tuple[str, str | Callable[[sqlite3.Connection, Progress | None], None]]] = [
    ("001_requests", M001_REQUESTS),
    ("002_sessions", M002_SESSIONS),
    ("003_conversation_tree", m003_conversation_tree),
    ("004_resent_replies", m004_resent_replies),
    ("005_session_lifecycle", M005_SESSION_LIFECYCLE),
]


def run_script(conn: sqlite3.Connection, sql: str) -> None:
    """Run each statement of `sql` in the current transaction (executescript would commit)."""
    stmt = ""
    for line in sql.splitlines(keepends=True):
        stmt += line
        if sqlite3.complete_statement(stmt):
            if stmt.strip():
                conn.execute(stmt)
            stmt = ""
    if stmt.strip():
        conn.execute(stmt)


def applied_sync(conn: sqlite3.Connection) -> list[str]:
    conn.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    return [row[0] for row in conn.execute("SELECT name FROM _migrations ORDER BY name")]


def migrate_file(path: str, progress: Progress | None = None) -> list[str]:
    """Apply pending migrations to the database at `path`, each in its own transaction
    (a failure leaves nothing of it); return the names applied. Instances starting
    together migrate once: each step re-checks under the write lock."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    try:
        conn.execute("PRAGMA page_size=8192")  # a new file's (see db.PRAGMAS); before WAL fixes it
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA foreign_keys=OFF")  # tables are rebuilt inside a step
        ran: list[str] = []
        for name, step in MIGRATIONS:
            if name in applied_sync(conn):
                continue
            conn.execute("BEGIN IMMEDIATE")
            try:
                if name in applied_sync(conn):  # another process migrated first
                    conn.execute("ROLLBACK")
                    continue
                if isinstance(step, str):
                    run_script(conn, step)
                else:
                    step(conn, progress)
                conn.execute("INSERT INTO _migrations(name, applied_at) VALUES (?, ?)", (name, time.time()))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            ran.append(name)
        return ran
    finally:
        conn.close()


async def migrate(conn: aiosqlite.Connection, progress: Progress | None = None) -> list[str]:
    """Apply pending migrations to the file `conn` has open (in a thread, on a connection
    of its own); return the names applied."""
    async with conn.execute("SELECT file FROM pragma_database_list WHERE name = 'main'") as cur:
        (path,) = await cur.fetchone()  # type: ignore[misc]
    if not path:
        raise ValueError("migrations need a database file")
    await conn.commit()
    return await asyncio.to_thread(migrate_file, path, progress)
