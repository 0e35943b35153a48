"""A finished request as rows: its history and replies in the conversation tree, its
request row, and its share of the per-minute roll-ups.

Used by the log writer process for every record and by the schema migration for the rows
of an older release, so both store exactly the same shape.
"""

from __future__ import annotations

from typing import Any, Callable

import orjson

from ..as_chat import KINDS, reply_message, request_messages
from ..replies import assemble_stream, completion, completion_like, responses_reply, text_completion_reply
from ..records import RequestRecord, iso
from .tree import CUT_MARK, Tree

COLUMNS = (
    "id", "received_at", "finished_at", "method", "path", "client", "user_agent", "model", "provider",
    "upstream_model", "stream", "status", "outcome", "error", "finish_reason", "prompt_tokens",
    "completion_tokens", "total_tokens", "cached_tokens", "chunk_count", "ttfb_ms", "duration_ms",
    "session_id", "turn", "chat_id", "parent_id", "reply_id", "tip_message", "prompt_message",
    "reply_message", "replies", "params", "params_blobs", "overrides", "body_blob", "response", "cut",
    "attempts",
)  # fmt: skip
CHAT_FORMATS = ("chat", "stream", "completion")
READING_ROOT = b"as_chat"  # the parent key of a reading's first message (a chat's is b"")
ATTACH = "UPDATE requests SET session_id = ?1, chat_id = ?1 WHERE id = ?2 AND session_id IS NULL"
INSERT_REQUEST = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"

# Latency histogram bounds (ms) of the roll-ups; the last bucket is everything above.
BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
NB = len(BUCKETS_MS) + 1
ROLLUP_KEY = ("span", "at", "model", "provider", "outcome", "client")
# Each request counts in its minute, its hour and its day: `at` is the period's start, cut
# from the ISO time (YYYY-MM-DDTHH:MM, YYYY-MM-DDTHH, YYYY-MM-DD).
SPANS = (("m", 16), ("h", 13), ("d", 10))
ROLLUP_SUMS = (
    ("requests", "errors", "prompt_tokens", "completion_tokens", "cached_tokens", "ttfb_count", "ttfb_sum", "duration_sum")
    + tuple(f"t{i}" for i in range(NB))
    + tuple(f"d{i}" for i in range(NB))
)
UPSERT_ROLLUP = (
    f"INSERT INTO rollups ({', '.join(ROLLUP_KEY + ROLLUP_SUMS)}) VALUES ({', '.join('?' * (len(ROLLUP_KEY) + len(ROLLUP_SUMS)))}) "
    f"ON CONFLICT ({', '.join(ROLLUP_KEY)}) DO UPDATE SET "
    + ", ".join(f"{c} = {c} + excluded.{c}" for c in ROLLUP_SUMS)
)


def bucket(ms: float) -> int:
    for i, bound in enumerate(BUCKETS_MS):
        if ms <= bound:
            return i
    return NB - 1


def _count(value: Any) -> int | None:
    """A token count: a number (or digits) in SQLite's 64-bit range, else None."""
    if isinstance(value, str) and value.isdecimal() and len(value) <= 19:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value) if -(2**63) <= value < 2**63 else None


def _str(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value if value and isinstance(value, str) else None


class Rows:
    """Builds the rows of one record at a time into `tree`'s batch and `rollups`."""

    def __init__(self, tree: Tree, redact: Callable[[str], str], max_body_bytes: int) -> None:
        self.tree = tree
        self.redact = redact
        self.max_body = max_body_bytes
        self.rollups: dict[tuple[Any, ...], list[float]] = {}
        self.attach: list[tuple[str, str]] = []  # (session id, request id): after the inserts

    def _text(self, value: str | None) -> str | None:
        return None if value is None else self.redact(value)

    def _json(self, value: Any) -> str | None:
        return None if value is None else self.redact(orjson.dumps(value).decode())

    def _capped(self, data: bytes, cut: list[str], where: str) -> str:
        extra = len(data) - self.max_body
        text = data[: self.max_body].decode("utf-8", "replace") if extra > 0 else data.decode("utf-8", "replace")
        if extra > 0:
            cut.append(where)
            text += CUT_MARK.format(n=extra)
        return self.redact(text)

    def take_rollups(self) -> list[tuple[Any, ...]]:
        """The batch's roll-up rows: each minute's sums, and added up by hour and by day."""
        spans: dict[tuple[Any, ...], list[float]] = {}
        for (minute, *rest), v in self.rollups.items():
            for span, width in SPANS:
                key = (span, minute[:width], *rest)
                acc = spans.get(key)
                if acc is None:
                    spans[key] = list(v)
                else:
                    for i, x in enumerate(v):
                        acc[i] += x
        self.rollups = {}
        return [key + tuple(v) for key, v in spans.items()]

    def take_attach(self) -> list[tuple[str, str]]:
        out, self.attach = self.attach, []
        return out

    def build(self, r: RequestRecord) -> tuple[Any, ...]:
        """The request row of `r` (its tree statements gather in `self.tree`)."""
        cut: list[str] = []
        reply = self._reply(r, cut)
        choices = [c for c in (reply or {}).get("choices") or () if isinstance(c, dict)]
        placed, request = self._request(r, cut)
        tip = placed.tip if placed is not None else None
        # A body kept whole (its blob) whose messages were placed: a reading (`as_chat`).
        reading = placed is not None and request[3] is not None
        reply_message = replies = response = None
        if reply is not None and placed is not None and tip is not None and reading:
            reply_message, response = self._answer_node(placed, r.reply_format or "", reply), self._json(reply)
        elif reply is not None and placed is not None and tip is not None:
            reply_message, replies, response = self._replies(placed, reply, choices)
        elif reply is not None:
            response = self._json(reply)
        elif r.response_body is not None:
            response = self._capped(r.response_body, cut, "response body")
        if placed is not None and not reading:  # a reading's caps cut only the reading: nothing stored
            cut += placed.cut
        received = iso(r.started)
        row = (
            r.id,
            received,
            iso(r.finished) if r.finished else None,
            r.method,
            r.path,
            r.client,
            self._text(r.user_agent),
            self._text(r.model),
            r.provider,
            r.upstream_model,
            None if r.stream is None else int(r.stream),
            r.status,
            r.outcome,
            self._text(r.error),
            r.finish_reason,
            r.prompt_tokens,
            r.completion_tokens,
            r.total_tokens,
            r.cached_tokens,
            r.chunk_count,
            None if r.ttfb_ms is None else round(r.ttfb_ms, 3),
            None if r.duration_ms is None else round(r.duration_ms, 3),
            r.session_id if r.log_session else None,
            r.turn,
            r.chat_id if r.log_session else None,
            r.parent_id,
            r.reply_id,
            tip,
            placed.prompt if placed is not None else None,
            reply_message,
            replies,
            *request,
            response,
            ", ".join(cut) if cut else None,
            self._json([{**a, "error": self._text(a.get("error"))} for a in r.attempts]) if r.attempts else None,
        )
        self._roll(r, received[:16])
        if r.attach and r.session_id:
            self.attach.append((r.session_id, r.attach))
        return row

    def _reply(self, r: RequestRecord, cut: list[str]) -> dict[str, Any] | None:
        """The reply `r` got, read as its format says ("chat", also "stream" and
        "completion", the names of this schema's first release: a chat reply, its events if
        it was streamed through, else its JSON; "responses"; "text_completion"); the
        record's tokens, finish reason and reply id taken from it ("embeddings": its usage)."""
        reply: dict[str, Any] | None = None
        if r.reply_format in CHAT_FORMATS and r.stream_body is not None:
            reply = assemble_stream(r.stream_body)
            r.chunk_count = reply.pop("_events")
        elif r.reply_format in CHAT_FORMATS and r.response_body and (r.status is None or r.status < 400):
            reply = completion(r.response_body)
        elif r.reply_format in ("responses", "text_completion") and r.status == 200:
            read = responses_reply if r.reply_format == "responses" else text_completion_reply
            data = r.stream_body if r.stream_body is not None else r.response_body
            reply = read(data, r.stream_body is not None) if data is not None else None
            if reply is not None and "_events" in reply:
                r.chunk_count = reply.pop("_events")
        elif r.reply_format == "embeddings" and r.status == 200 and r.response_body:
            reply = completion_like(r.response_body)  # model and usage (the vectors are not kept)
        if r.stream_cut:
            cut.append(f"response stream ({r.stream_cut} bytes not kept)")
        if reply is None:
            return None
        usage = reply.get("usage")
        if isinstance(usage, dict):
            # Chat and completions say prompt/completion tokens; the Responses API input/output.
            r.prompt_tokens = _count(usage.get("prompt_tokens", usage.get("input_tokens")))
            r.completion_tokens = _count(usage.get("completion_tokens", usage.get("output_tokens")))
            r.total_tokens = _count(usage.get("total_tokens"))
            details = usage.get("prompt_tokens_details", usage.get("input_tokens_details"))
            r.cached_tokens = _count(details.get("cached_tokens")) if isinstance(details, dict) else None
        choices = [c for c in reply.get("choices") or () if isinstance(c, dict)]
        if choices and r.finish_reason is None:
            r.finish_reason = _str(choices[0].get("finish_reason"))
        if r.reply_format == "responses" and r.finish_reason is None:
            r.finish_reason = _str(reply.get("status"))  # completed, incomplete, failed
        if r.reply_id is None:
            r.reply_id = _str(reply.get("id"))
        return reply

    def _request(self, r: RequestRecord, cut: list[str]) -> tuple[Any, tuple[Any, ...]]:
        """The request body in the tree: (where its history was placed, or None; its
        columns params, params_blobs, overrides, body_blob). A body that is not a chat
        request is kept whole as a blob (cut at the body cap); a Responses or legacy
        completion body that fits is also read as chat messages, placed for search and
        listings (`_read_as_chat`)."""
        tree = self.tree
        found = None
        if r.request_body:
            try:
                found = tree.request(r.request_body, r.session_id)
            except ValueError:
                found = None
        if found is not None:
            placed, params, blobs = found
            if r.turn is None:
                r.turn = placed.turn
            overrides = self._json({str(i): m for i, m in placed.overrides.items()}) if placed.overrides else None
            return placed, (params, blobs, overrides, None)
        if r.request_body is None:
            return None, (None, None, None, None)
        body_blob = tree.blob(r.request_body[: self.max_body])
        if len(r.request_body) > self.max_body:
            cut.append("request body")
        reading = self._read_as_chat(r) if len(r.request_body) <= self.max_body else None
        return reading, (None, None, None, body_blob)

    def _read_as_chat(self, r: RequestRecord) -> Any:
        """A Responses or legacy completion request's messages (`as_chat`) in the tree, in
        no conversation (where its prompt is, for search and listings); None for any other
        body. The request itself is kept whole, in its blob. Readings grow from a root of
        their own: their nodes are never a chat request's, whose resent forms and overrides
        they would otherwise decide."""
        if r.reply_format not in KINDS or not r.request_body:
            return None
        messages = request_messages(r.reply_format, completion_like(r.request_body))
        if not messages:
            return None
        try:
            return self.tree.place(orjson.dumps(messages), None, root=READING_ROOT)
        except (ValueError, TypeError):  # nested past orjson's depth
            return None

    def _answer_node(self, placed: Any, kind: str, reply: dict[str, Any]) -> int | None:
        """The node of an answer read as one assistant message (`as_chat`), under the
        request's messages; its response keeps the whole answer besides."""
        m = reply_message(kind, reply)
        return None if m is None else self.tree.reply(placed, m, "output")[0]

    def _replies(self, placed: Any, reply: dict[str, Any], choices: list[dict[str, Any]]) -> tuple[Any, Any, str | None]:
        """Each choice's message as a node under the request's tip: (the first choice's
        node, the JSON list of every choice's node when there are several, the response
        without the messages its nodes hold)."""
        ids = []
        meta_choices = []
        for c in choices:
            msg = c.get("message")
            nid, same = None, False
            if isinstance(msg, dict):
                nid, same = self.tree.reply(placed, msg, f"choices[{c.get('index', 0)}]")
            ids.append(nid)  # one per choice, in order (None: a choice with no message)
            # The message is its node's body: kept here only where it differs.
            meta_choices.append({k: v for k, v in c.items() if k != "message" or not same})
        reply_message = replies = None
        if ids:
            reply_message = ids[0]
            replies = orjson.dumps(ids).decode() if len(ids) > 1 or ids[0] is None else None
        # An answer without choices (a Responses one sent with `messages`) is kept as it came.
        return reply_message, replies, self._json({**reply, "choices": meta_choices} if "choices" in reply else reply)

    def _roll(self, r: RequestRecord, minute: str) -> None:
        key = (minute, self._text(r.model) or "", r.provider or "", r.outcome or "", r.client or "")
        v = self.rollups.get(key)
        if v is None:
            v = self.rollups[key] = [0] * len(ROLLUP_SUMS)
        v[0] += 1
        v[1] += r.outcome != "ok"
        v[2] += r.prompt_tokens or 0
        v[3] += r.completion_tokens or 0
        v[4] += r.cached_tokens or 0
        if r.ttfb_ms is not None:
            v[5] += 1
            v[6] += r.ttfb_ms
            v[8 + bucket(r.ttfb_ms)] += 1
        if r.duration_ms is not None:
            v[7] += r.duration_ms
            v[8 + NB + bucket(r.duration_ms)] += 1
