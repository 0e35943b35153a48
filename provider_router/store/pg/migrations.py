"""Numbered, append-only schema migrations for PostgreSQL, recorded in `_migrations`, each
applied in its own transaction under an advisory lock: instances starting together on one
empty database migrate it once, the others wait and find the steps applied.

The first step is the SQLite schema's final shape (store/migrations.py, 001-005) in
PostgreSQL's terms; see that module for what each table and column means. Never edit a
released step: add a new one at the end of `MIGRATIONS`.
"""

from __future__ import annotations

import time

import psycopg

# Advisory lock keys (one bigint each, arbitrary but fixed): 'prmigr', 'prpart', 'prepoc'.
MIGRATIONS_LOCK = 0x70726D696772
PARTITIONS_LOCK = 0x707270617274
EPOCH_LOCK = 0x707265706F63  # writers' batches share it; retention takes it alone (writer_epoch)
# Message and blob ids come from sequences in blocks of this many (see writer.SequenceIds).
ID_BLOCK = 1024

M001_SCHEMA = f"""
-- The conversation tree: every message once per position. `hash` is history.node_key's
-- chained key; `id` comes from message_ids in blocks per writer process, so that each
-- writer names the nodes of its batch (and their children) before writing them, without
-- colliding with another instance's writer. Two writers creating the same node at once
-- meet on the unique hash: the later one's batch is rolled back and prepared again.
CREATE SEQUENCE message_ids INCREMENT BY {ID_BLOCK};
CREATE TABLE messages (
    id bigint PRIMARY KEY,
    hash bytea NOT NULL UNIQUE,
    parent_id bigint,                 -- NULL: the first message of a conversation
    role text NOT NULL,
    body text NOT NULL,               -- JSON exactly as first seen (text: compared byte for byte)
    resent text,                      -- how requests carry a reply, when that differs from body
    carried smallint NOT NULL DEFAULT 1   -- 0: a reply no request has carried yet
);
CREATE INDEX messages_parent ON messages(parent_id);

-- Full-text terms of each message, once per message (SQLite: messages_fts, contentless):
-- history.message_text as a tsvector of the 'simple' configuration (words lower-cased, no
-- stemming, as FTS5's default tokenizer), in a table beside the messages so that a
-- message row is never rewritten to index it.
CREATE TABLE message_terms (
    id bigint PRIMARY KEY,            -- messages.id
    terms tsvector NOT NULL
);
CREATE INDEX message_terms_search ON message_terms USING gin (terms);

CREATE SEQUENCE blob_ids INCREMENT BY {ID_BLOCK};
CREATE TABLE blobs (
    id bigint PRIMARY KEY,
    hash bytea NOT NULL UNIQUE,
    data text NOT NULL,
    refs bigint NOT NULL DEFAULT 0
);

-- The request log, partitioned by day of `received_at`: retention detaches and drops
-- whole days (no dead rows, no VACUUM). Days are created ahead and on demand by
-- request_partitions() below; there is no default partition, so a day is never split out
-- of one later. `id` sorts bytewise (COLLATE "C"), as in SQLite, and its prefix is a range.
CREATE TABLE requests (
    id text COLLATE "C" NOT NULL,     -- records.new_id(): time-ordered
    received_at timestamptz NOT NULL,
    finished_at timestamptz,
    method text NOT NULL,
    path text NOT NULL,
    client text,
    user_agent text,
    model text,
    provider text,
    upstream_model text,
    stream smallint,
    status integer,
    outcome text,
    error text,
    finish_reason text,
    prompt_tokens bigint,
    completion_tokens bigint,
    total_tokens bigint,
    cached_tokens bigint,
    chunk_count bigint,
    ttfb_ms double precision,
    duration_ms double precision,
    session_id text,
    turn integer,
    chat_id text,
    parent_id text,
    reply_id text,
    tip_message bigint,
    prompt_message bigint,
    reply_message bigint,
    replies text,
    params text,
    params_blobs text,
    overrides text,
    body_blob bigint,
    response text,
    cut text,
    attempts text,
    PRIMARY KEY (id, received_at)
) PARTITION BY RANGE (received_at);
CREATE INDEX requests_received ON requests(received_at);
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

-- The days of `first`..`last` (inclusive) that have no partition yet get one: made apart
-- and attached, which locks the parent less than CREATE TABLE ... PARTITION OF (readers
-- and writers of other days go on). Serialised by an advisory lock: writers of several
-- instances meeting a new day at once create it once. Returns how many were made.
CREATE FUNCTION request_partitions(first date, last date) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    day date;
    part text;
    made integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock({PARTITIONS_LOCK});
    FOR day IN SELECT d::date FROM generate_series(first, last, interval '1 day') AS d LOOP
        part := 'requests_' || to_char(day, 'YYYYMMDD');
        IF to_regclass(part) IS NULL THEN
            EXECUTE format('CREATE TABLE %I (LIKE requests INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part);
            EXECUTE format('ALTER TABLE requests ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                part, day::text || ' 00:00:00+00', (day + 1)::text || ' 00:00:00+00');
            made := made + 1;
        END IF;
    END LOOP;
    RETURN made;
END $$;

-- Roll-ups of the requests by minute, hour and day, as in SQLite (rows.py writes them).
CREATE TABLE rollups (
    span text NOT NULL,
    at text NOT NULL,
    model text NOT NULL,
    provider text NOT NULL,
    outcome text NOT NULL,
    client text NOT NULL,
    requests bigint NOT NULL,
    errors bigint NOT NULL,
    prompt_tokens bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    cached_tokens bigint NOT NULL,
    ttfb_count bigint NOT NULL,
    ttfb_sum double precision NOT NULL,
    duration_sum double precision NOT NULL,
    {', '.join(f't{i} bigint NOT NULL' for i in range(14))},
    {', '.join(f'd{i} bigint NOT NULL' for i in range(14))},
    PRIMARY KEY (span, at, model, provider, outcome, client)
);

-- Bumped by whatever deletes messages or blobs (retention), holding EPOCH_LOCK alone: a
-- writer's batch holds it shared (an advisory lock: no row lock, so no multixacts from
-- every writer sharing one row), reads `n`, and one prepared from what may be gone is
-- prepared again.
CREATE TABLE writer_epoch (one boolean PRIMARY KEY DEFAULT true CHECK (one), n bigint NOT NULL);
INSERT INTO writer_epoch (n) VALUES (0);

-- Sessions, their turns, counters and upstream chats to delete: as in SQLite (003, 005).
CREATE TABLE sessions (
    id text COLLATE "C" PRIMARY KEY,
    fingerprint text NOT NULL,
    client text NOT NULL,
    provider text NOT NULL,
    upstream_model text NOT NULL,
    chat_id text,
    parent_id text,
    state text NOT NULL DEFAULT 'active',
    created_at timestamptz NOT NULL,
    last_accessed_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    message_count integer NOT NULL DEFAULT 0,
    request_count integer NOT NULL DEFAULT 0,
    metadata text
);
CREATE INDEX sessions_fingerprint ON sessions(fingerprint, state);
CREATE INDEX sessions_state_expires ON sessions(state, expires_at);
CREATE INDEX sessions_order ON sessions(last_accessed_at, id);
CREATE INDEX sessions_state_order ON sessions(state, last_accessed_at, id);
CREATE INDEX sessions_client_order ON sessions(client, last_accessed_at, id);

CREATE TABLE turns (
    session_id text NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    message_hash bytea NOT NULL,
    turn integer NOT NULL,
    chat_id text,
    reply_id text,
    request_id text,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (session_id, message_hash)
);
CREATE INDEX turns_message ON turns(message_hash);

CREATE TABLE session_tallies (event text PRIMARY KEY, n bigint NOT NULL);
INSERT INTO session_tallies (event, n) VALUES
    ('created', 0), ('expired', 0), ('evicted', 0), ('deleted', 0),
    ('ended_sessions', 0), ('ended_ms', 0), ('ended_requests', 0);
CREATE TABLE session_clients (client text PRIMARY KEY, created bigint NOT NULL, ended bigint NOT NULL);

CREATE TABLE chat_deletions (
    provider text NOT NULL,
    chat_id text NOT NULL,
    session_id text NOT NULL,
    deleted_at timestamptz,
    attempts integer NOT NULL DEFAULT 0,
    error text,
    PRIMARY KEY (provider, chat_id)
);
CREATE INDEX chat_deletions_pending ON chat_deletions(provider) WHERE deleted_at IS NULL;

-- SQLite's four counting triggers as one function each way. An ended session adds (sign
-- 1) or a revived one takes back (sign -1) its share of the ended figures; the duration
-- in whole ms, cut toward zero as SQLite's CAST does.
CREATE FUNCTION session_ended(s sessions, sign integer) RETURNS void LANGUAGE sql AS $$
    UPDATE session_tallies SET n = n + sign * CASE event
        WHEN 'ended_sessions' THEN 1
        WHEN 'ended_requests' THEN s.request_count
        ELSE trunc(extract(epoch FROM s.last_accessed_at - s.created_at) * 1000)::bigint END
    WHERE event IN ('ended_sessions', 'ended_ms', 'ended_requests');
$$;

CREATE FUNCTION sessions_counted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO session_clients AS c (client, created, ended)
        VALUES (coalesce(NEW.client, ''), 1, (NEW.state = 'expired')::int)
        ON CONFLICT (client) DO UPDATE SET created = c.created + 1, ended = c.ended + excluded.ended;
        IF NEW.state = 'expired' THEN  -- ended before its first write (saves are coalesced)
            PERFORM session_ended(NEW, 1);
        END IF;
    ELSIF TG_OP = 'UPDATE' AND OLD.state = 'active' AND NEW.state = 'expired' THEN
        PERFORM session_ended(NEW, 1);
        UPDATE session_clients SET ended = ended + 1 WHERE client = coalesce(NEW.client, '');
    ELSIF TG_OP = 'UPDATE' AND OLD.state = 'expired' AND NEW.state = 'active' THEN
        PERFORM session_ended(OLD, -1);
        UPDATE session_clients SET ended = ended - 1 WHERE client = coalesce(NEW.client, '');
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER sessions_counted AFTER INSERT OR UPDATE OF state ON sessions
    FOR EACH ROW EXECUTE FUNCTION sessions_counted();

-- Before a session row goes (turns go with it by cascade, after this): an active one
-- counts as ended, and its upstream chats are kept for deletion (a stateless upstream's
-- chat id is the session's own id: no upstream chat).
CREATE FUNCTION sessions_deleting() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.state = 'active' THEN
        PERFORM session_ended(OLD, 1);
        UPDATE session_clients SET ended = ended + 1 WHERE client = coalesce(OLD.client, '');
    END IF;
    INSERT INTO chat_deletions (provider, chat_id, session_id)
    SELECT OLD.provider, t.chat_id, OLD.id FROM turns t WHERE t.session_id = OLD.id AND t.chat_id IS NOT NULL
    UNION SELECT OLD.provider, OLD.chat_id, OLD.id WHERE OLD.chat_id IS NOT NULL AND OLD.chat_id <> OLD.id
    ON CONFLICT DO NOTHING;
    RETURN OLD;
END $$;
CREATE TRIGGER sessions_deleting BEFORE DELETE ON sessions
    FOR EACH ROW EXECUTE FUNCTION sessions_deleting();

-- The request log with its text, for psql.
CREATE VIEW request_log AS
SELECT r.*,
    CASE json_typeof(p.body::json -> 'content') WHEN 'array' THEN
        (SELECT string_agg(e ->> 'text', chr(10)) FROM json_array_elements(p.body::json -> 'content') e)
    ELSE p.body::json ->> 'content' END AS prompt_text,
    CASE json_typeof(a.body::json -> 'content') WHEN 'array' THEN
        (SELECT string_agg(e ->> 'text', chr(10)) FROM json_array_elements(a.body::json -> 'content') e)
    ELSE a.body::json ->> 'content' END AS response_text,
    coalesce(a.body::json ->> 'reasoning_content', a.body::json ->> 'reasoning') AS reasoning_text
FROM requests r
LEFT JOIN messages p ON p.id = r.prompt_message
LEFT JOIN messages a ON a.id = r.reply_message;
"""

# (name, SQL). Append only.
MIGRATIONS: list[tuple[str, str]] = [
    ("001_schema", M001_SCHEMA),
]


def applied(conn: psycopg.Connection) -> list[str]:
    """The names of the steps applied (none on an empty database)."""
    if conn.execute("SELECT to_regclass('_migrations')").fetchone()[0] is None:  # type: ignore[index]
        return []
    return [row[0] for row in conn.execute("SELECT name FROM _migrations ORDER BY name")]


def migrate(dsn: str) -> list[str]:
    """Apply pending steps to the database at `dsn`, each in its own transaction under
    the migrations' advisory lock (a failure leaves nothing of it); the names applied."""
    ran: list[str] = []
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        for name, sql in MIGRATIONS:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATIONS_LOCK,))
                conn.execute("CREATE TABLE IF NOT EXISTS _migrations (name text PRIMARY KEY, applied_at double precision NOT NULL)")
                if name in applied(conn):  # another instance migrated first
                    continue
                conn.execute(sql)  # type: ignore[arg-type]  # no parameters: sent as one simple query
                conn.execute("INSERT INTO _migrations (name, applied_at) VALUES (%s, %s)", (name, time.time()))
            ran.append(name)
    return ran
