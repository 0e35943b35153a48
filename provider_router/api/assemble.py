"""What a forwarded OpenAI reply said, for the log: text, reasoning, finish reason, usage,
reply id and chunk count, from a `chat.completion` body or a complete SSE body.

Runs in the log writer process, never on the request path (a 64-chunk stream costs a few
hundred microseconds to parse). Imports only orjson and the SSE parser, so that process
starts quickly.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..messages import content_text
from ..sse import SSEParser
from ..store.records import RequestRecord


def _fill_from_message(rec: RequestRecord, obj: dict[str, Any]) -> None:
    rec.reply_id = obj.get("id") or rec.reply_id
    usage = obj.get("usage")
    if isinstance(usage, dict):
        rec.prompt_tokens = usage.get("prompt_tokens")
        rec.completion_tokens = usage.get("completion_tokens")
        rec.total_tokens = usage.get("total_tokens")


def assemble_completion(rec: RequestRecord) -> None:
    """Fill text, finish reason and usage from a non-stream chat.completion body."""
    if not rec.response_body:
        return
    obj = orjson.loads(rec.response_body)
    if not isinstance(obj, dict):
        return
    _fill_from_message(rec, obj)
    choices = obj.get("choices") or []
    if choices and isinstance(choices[0], dict):
        msg = choices[0].get("message") or {}
        rec.response_text = content_text(msg.get("content"))
        rec.reasoning_text = msg.get("reasoning_content") or msg.get("reasoning") or None
        rec.finish_reason = choices[0].get("finish_reason")


def stream_events(data: bytes) -> list[Any]:
    """The JSON payloads of a complete SSE body, as the SSE parser would find them, parsed
    in one call where possible (one `loads` per event costs ~3x more)."""
    # What OpenAI-compatible servers send: every event one `data: ` line, events separated
    # by one blank line, LF only. Then each separator can become a comma and the body parse
    # as one array: taken only when every line break is a separator's and each event gave
    # exactly one value, so any other framing reads as the parser reads it.
    body = data.rstrip(b"\n")
    if body.endswith(b"\n\ndata: [DONE]"):
        body = body[:-14]
    elif body == b"data: [DONE]":
        return []
    seps = body.count(b"\n\ndata: ")
    if body.startswith(b"data: ") and body.count(b"\n") == 2 * seps and b"\r" not in body:
        try:
            events = orjson.loads(b"[" + body[6:].replace(b"\n\ndata: ", b",") + b"]")
            if len(events) == seps + 1:
                return events  # type: ignore[no-any-return]
        except orjson.JSONDecodeError:
            pass
    # Any other framing (CRLF, comments, `event:` fields, multi-line data): the parser.
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


def _deltas(rec: RequestRecord, events: list[Any]) -> tuple[list[str], list[str]]:
    """Text and reasoning pieces when every event has the usual shape, in whole-list passes
    (~6x cheaper than the event loop below); raises on any other shape."""
    choices = [c for e in events for c in e.get("choices") or ()]
    deltas = [c["delta"] for c in choices]
    # Non-string content (a list, a number) makes join() raise; absent or null is "".
    text = "".join([d.get("content") or "" for d in deltas])
    reasoning = "".join([d.get("reasoning_content") or d.get("reasoning") or "" for d in deltas])
    finishes = [f for f in [c.get("finish_reason") for c in choices] if f]
    if finishes:
        rec.finish_reason = finishes[-1]
    return [text], [reasoning]


def _deltas_one_by_one(rec: RequestRecord, events: list[Any]) -> tuple[list[str], list[str]]:
    """Text and reasoning pieces from events of any shape, skipping what is not a delta."""
    text: list[str] = []
    reasoning: list[str] = []
    for obj in events:
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
            if choice.get("finish_reason"):
                rec.finish_reason = choice["finish_reason"]
    return text, reasoning


def assemble_stream(rec: RequestRecord) -> None:
    """Fill text, finish reason, usage and chunk count from forwarded SSE bytes."""
    events = [e for e in stream_events(rec.stream_body or b"") if isinstance(e, dict)]
    for obj in events:
        if obj.get("usage") or rec.reply_id is None:
            _fill_from_message(rec, obj)
    finish = rec.finish_reason
    try:
        text, reasoning = _deltas(rec, events)
    except (KeyError, TypeError, AttributeError):
        rec.finish_reason = finish
        text, reasoning = _deltas_one_by_one(rec, events)
    rec.response_text = "".join(text)
    rec.reasoning_text = "".join(reasoning) or None
    rec.chunk_count = len(events)
    rec.stream_body = None


ASSEMBLERS = {"completion": assemble_completion, "stream": assemble_stream}
