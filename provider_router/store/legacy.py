"""Reading the log of the release before the conversation tree (schema 001-002: every
request row with its whole bodies and texts), for migration 003.

Each old row becomes the record it was written from, as far as the row tells, and goes
through the same `Rows` the log writer uses; a body the tree cannot read (one stored cut,
with its marker) is kept whole as a blob, so nothing the old log held is lost.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime
from typing import Any, Callable

import orjson

from ..records import RequestRecord
from .rows import INSERT_REQUEST, UPSERT_ROLLUP, Rows
from .tree import Tree

# Called with (what, done, total) as rows are converted (`migrations.Progress`).
Progress = Callable[[str, int, int], None]

BATCH = 2_000


def _ts(text: str | None) -> float | None:
    return None if not text else datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _is_json(text: str | None) -> bool:
    try:
        orjson.loads(text or "")
    except orjson.JSONDecodeError:
        return False
    return True


def _record(row: sqlite3.Row) -> RequestRecord:
    r = RequestRecord(row["method"], row["path"], id=row["id"], started=_ts(row["received_at"]) or 0.0)
    r.finished = _ts(row["finished_at"])
    for k in (
        "client", "user_agent", "model", "provider", "upstream_model", "status", "outcome", "error", "finish_reason",
        "prompt_tokens", "completion_tokens", "total_tokens", "chunk_count", "ttfb_ms", "duration_ms", "session_id",
        "turn", "chat_id", "parent_id", "reply_id",
    ):  # fmt: skip
        setattr(r, k, row[k])
    r.stream = None if row["stream"] is None else bool(row["stream"])
    r.log_session = row["session_id"] is not None
    r.log_line = False
    if row["attempts"]:
        r.attempts = orjson.loads(row["attempts"])
    if row["request_body"] is not None:
        r.request_body = row["request_body"].encode()
    body = row["response_body"]
    if r.status == 200 and row["response_text"] is not None and (r.stream or not _is_json(body)):
        # A stream's row kept its assembled text, not its events; a body stored cut kept
        # its whole text beside it: that text is the reply.
        message: dict[str, Any] = {"role": "assistant", "content": row["response_text"]}
        if row["reasoning_text"]:
            message["reasoning_content"] = row["reasoning_text"]
        reply: dict[str, Any] = {
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": row["finish_reason"]}],
        }
        if row["reply_id"]:
            reply["id"] = row["reply_id"]
        if row["prompt_tokens"] is not None or row["completion_tokens"] is not None:
            reply["usage"] = {
                "prompt_tokens": row["prompt_tokens"],
                "completion_tokens": row["completion_tokens"],
                "total_tokens": row["total_tokens"],
            }
        r.response_body = orjson.dumps(reply)
        r.reply_format = "chat"
    elif body is not None:
        r.response_body = body.encode()
        r.reply_format = "chat" if r.status == 200 else None
    return r


def convert_requests(conn: sqlite3.Connection, progress: Progress | None) -> None:
    """Old `requests` rows -> `requests_v3`, the tree and the roll-ups; old `turns` ->
    `turns_v3`, keyed by their reply's node."""
    conn.row_factory = sqlite3.Row
    try:
        (total,) = conn.execute("SELECT count(*) FROM requests").fetchone()
        tree = Tree(conn)
        rows = Rows(tree, lambda s: s, max_body_bytes=1 << 62)
        insert = INSERT_REQUEST.replace("INTO requests ", "INTO requests_v3 ", 1)
        done, last = 0, 0
        while True:
            batch = conn.execute("SELECT rowid, * FROM requests WHERE rowid > ? ORDER BY rowid LIMIT ?", (last, BATCH)).fetchall()
            if not batch:
                break
            out = [rows.build(_record(row)) for row in batch]
            for sql, many in tree.take():
                conn.executemany(sql, many)
            conn.executemany(insert, out)
            conn.executemany(UPSERT_ROLLUP, rows.take_rollups())
            last = batch[-1]["rowid"]
            done += len(batch)
            if progress is not None:
                progress("requests", done, total)
        conn.execute(
            "INSERT OR IGNORE INTO turns_v3 (session_id, message_hash, turn, chat_id, reply_id, request_id, created_at) "
            "SELECT t.session_id, m.hash, t.turn, t.chat_id, t.reply_id, t.request_id, t.created_at "
            "FROM turns t JOIN requests_v3 r ON r.id = t.request_id JOIN messages m ON m.id = r.reply_message "
            # Stateless sessions (chat id = session id) kept turns only for the old log's threading.
            "WHERE t.chat_id IS NOT t.session_id"
        )
    finally:
        conn.row_factory = None
