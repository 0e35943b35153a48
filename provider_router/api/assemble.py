"""What a forwarded OpenAI reply said, for the log: text, reasoning, finish reason, usage,
reply id and chunk count, from a `chat.completion` body or a complete SSE body.

Runs in the log writer process, never on the request path. One mechanism, two readings:
the body is first decoded into typed structs holding only the fields read here (msgspec
skips the rest without building it: ~2x cheaper than orjson's dicts for a 64-chunk
stream); a body the typed reading fails on (a shape that does not fit its types: a list
as content, a number as id, an event that is not an object; odd SSE framing; invalid
UTF-8 in a field it keeps; nesting deeper than it recurses) gets the generic reading,
which checks every field before use. Wherever the typed reading applies the two agree
(tested), with one difference: fields it skips are not checked, so a reply with, say,
`1e999` or invalid UTF-8 in an unread field is logged where the generic reading would
refuse the body or drop the event. Imports only msgspec, orjson and the SSE parser, so
that process starts quickly.
"""

from __future__ import annotations

from typing import Any

import msgspec
import orjson

from ..messages import content_text
from ..sse import SSEParser
from ..store.records import RequestRecord


# -- the typed reading -------------------------------------------------------------------------
class _Delta(msgspec.Struct, gc=False):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class _ChunkChoice(msgspec.Struct, gc=False):
    delta: _Delta
    finish_reason: str | None = None


class _Chunk(msgspec.Struct, gc=False):
    id: str | None = None
    choices: list[_ChunkChoice] | None = None
    usage: dict[str, Any] | None = None


class _Message(msgspec.Struct, gc=False):
    content: Any = None
    reasoning_content: Any = None
    reasoning: Any = None


class _Choice(msgspec.Struct, gc=False):
    message: _Message | None = None
    finish_reason: Any = None


class _Completion(msgspec.Struct, gc=False):
    id: Any = None
    choices: list[_Choice] | None = None
    usage: Any = None


_CHUNKS = msgspec.json.Decoder(list[_Chunk])
_COMPLETION = msgspec.json.Decoder(_Completion)


# What an upstream sends lands in typed columns: a value no column can take (a list, an
# integer past 64 bits) would fail the record's row, so only these shapes are kept.
def _fill_usage(rec: RequestRecord, reply_id: Any, usage: Any) -> None:
    if isinstance(reply_id, int) and not isinstance(reply_id, bool):
        reply_id = str(reply_id)
    if reply_id and isinstance(reply_id, str):
        rec.reply_id = reply_id
    if isinstance(usage, dict):
        rec.prompt_tokens = _count(usage.get("prompt_tokens"))
        rec.completion_tokens = _count(usage.get("completion_tokens"))
        rec.total_tokens = _count(usage.get("total_tokens"))


def _count(value: Any) -> Any:
    """A token count: a number (or digits) in SQLite's 64-bit range, else None."""
    if isinstance(value, str) and value.isdecimal() and len(value) <= 19:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if -(2**63) <= value < 2**63 else None


def _text(*values: Any) -> str | None:
    """The first of `values` that is a non-empty string."""
    for v in values:
        if v and isinstance(v, str):
            return v
    return None


def assemble_completion(rec: RequestRecord) -> None:
    """Fill text, finish reason and usage from a non-stream chat.completion body."""
    if not rec.response_body:
        return
    try:
        obj = _COMPLETION.decode(rec.response_body)
    except Exception:  # see the module's docstring
        _completion_generic(rec, orjson.loads(rec.response_body))
        return
    _fill_usage(rec, obj.id, obj.usage)
    if obj.choices:
        choice, msg = obj.choices[0], obj.choices[0].message
        rec.response_text = content_text(msg.content if msg else None)
        rec.reasoning_text = _text(msg.reasoning_content, msg.reasoning) if msg else None
        rec.finish_reason = _text(choice.finish_reason)


def _completion_generic(rec: RequestRecord, obj: Any) -> None:
    if not isinstance(obj, dict):
        return
    _fill_usage(rec, obj.get("id"), obj.get("usage"))
    choices = obj.get("choices") or []
    if choices and isinstance(choices[0], dict):
        msg = choices[0].get("message") or {}
        rec.response_text = content_text(msg.get("content"))
        rec.reasoning_text = _text(msg.get("reasoning_content"), msg.get("reasoning"))
        rec.finish_reason = _text(choices[0].get("finish_reason"))


def usual_array(data: bytes) -> tuple[bytes, int] | None:
    """A complete SSE body as one JSON array of its events' values, and the number of
    events, when it is framed as OpenAI-compatible servers frame it: every event one
    `data: ` line, events separated by one blank line, LF only, an optional `[DONE]` last.
    None for any other framing (CRLF, comments, `event:` fields, multi-line data)."""
    body = data.rstrip(b"\n")
    if body.endswith(b"\n\ndata: [DONE]"):
        body = body[:-14]
    elif body == b"data: [DONE]" or not body:
        return b"[]", 0
    if not body.startswith(b"data: "):
        return None
    inner = body[6:].replace(b"\n\ndata: ", b",")
    # Every line break must have been a separator's (each replacement took two, and is 7
    # bytes shorter: no scan to count them). The caller checks that each event gave one value.
    if b"\n" in inner or b"\r" in inner:
        return None
    return b"[" + inner + b"]", (len(body) - 6 - len(inner)) // 7 + 1


def assemble_stream(rec: RequestRecord) -> None:
    """Fill text, finish reason, usage and chunk count from forwarded SSE bytes."""
    data = rec.stream_body or b""
    usual = usual_array(data)
    chunks = None
    if usual is not None:
        try:
            chunks = _CHUNKS.decode(usual[0])
        except Exception:  # see the module's docstring
            pass
    if chunks is not None and len(chunks) == usual[1]:  # type: ignore[index]
        for c in chunks:
            if c.usage or rec.reply_id is None:
                _fill_usage(rec, c.id, c.usage)
        choices = [ch for c in chunks if c.choices for ch in c.choices]
        rec.response_text = "".join([ch.delta.content or "" for ch in choices])
        rec.reasoning_text = "".join([ch.delta.reasoning_content or ch.delta.reasoning or "" for ch in choices]) or None
        finishes = [ch.finish_reason for ch in choices if ch.finish_reason]
        if finishes:
            rec.finish_reason = finishes[-1]
        rec.chunk_count = len(chunks)
    else:
        _stream_generic(rec, [e for e in stream_events(data, usual) if isinstance(e, dict)])
    rec.stream_body = None


# -- the generic reading -----------------------------------------------------------------------
def stream_events(data: bytes, usual: tuple[bytes, int] | None = None) -> list[Any]:
    """The JSON payloads of a complete SSE body, as the SSE parser would find them, parsed
    in one call where possible (one `loads` per event costs ~3x more). `usual` is
    `usual_array(data)` if the caller has it."""
    usual = usual or usual_array(data)
    if usual is not None:
        try:
            events = orjson.loads(usual[0])
            if len(events) == usual[1]:
                return events  # type: ignore[no-any-return]
        except orjson.JSONDecodeError:
            pass
    payloads = [ev.data for ev in SSEParser().feed(data + b"\n\n") if ev.data and ev.data != "[DONE]"]
    try:
        events = orjson.loads("[" + ",".join(payloads) + "]")
        if len(events) == len(payloads):
            return events  # type: ignore[no-any-return]
    except orjson.JSONDecodeError:
        pass
    out = []  # some event is not JSON (or not one value): each on its own, skipping those
    for payload in payloads:
        try:
            out.append(orjson.loads(payload))
        except orjson.JSONDecodeError:
            continue
    return out


def _stream_generic(rec: RequestRecord, events: list[dict[str, Any]]) -> None:
    """Text, reasoning, finish reason and usage from events of any shape, skipping what
    is not a delta."""
    text: list[str] = []
    reasoning: list[str] = []
    for obj in events:
        if obj.get("usage") or rec.reply_id is None:
            _fill_usage(rec, obj.get("id"), obj.get("usage"))
        choices = obj.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                content = delta.get("content")
                if isinstance(content, str):
                    text.append(content)
                r = delta.get("reasoning_content") or delta.get("reasoning")
                if isinstance(r, str):
                    reasoning.append(r)
            finish = choice.get("finish_reason")
            if finish and isinstance(finish, str):
                rec.finish_reason = finish
    rec.response_text = "".join(text)
    rec.reasoning_text = "".join(reasoning) or None
    rec.chunk_count = len(events)


ASSEMBLERS = {"completion": assemble_completion, "stream": assemble_stream}
