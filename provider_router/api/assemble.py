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
    """The JSON payloads of a complete SSE body, parsed in one call where possible."""
    # splitlines() and a prefix test run in C: ~3x cheaper than a multi-line regex.
    payloads = [line[5:] for line in data.splitlines() if line.startswith(b"data:")]
    payloads = [p for p in (p.strip() for p in payloads) if p and p != b"[DONE]"]
    try:
        # One parse of all events as a JSON array: ~3x cheaper than one loads() per event.
        return orjson.loads(b"[" + b",".join(payloads) + b"]")  # type: ignore[no-any-return]
    except orjson.JSONDecodeError:
        pass
    # A malformed or multi-line event: the incremental parser, event by event.
    events = []
    for ev in SSEParser().feed(data + b"\n\n"):
        if ev.data and ev.data != "[DONE]":
            try:
                events.append(orjson.loads(ev.data))
            except orjson.JSONDecodeError:
                continue
    return events


def assemble_stream(rec: RequestRecord) -> None:
    """Fill text, finish reason, usage and chunk count from forwarded SSE bytes."""
    text: list[str] = []
    reasoning: list[str] = []
    count = 0
    for obj in stream_events(rec.stream_body or b""):
        if not isinstance(obj, dict):
            continue
        count += 1
        if obj.get("usage") or rec.reply_id is None:
            _fill_from_message(rec, obj)
        for choice in obj.get("choices") or ():
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
    rec.response_text = "".join(text)
    rec.reasoning_text = "".join(reasoning) or None
    rec.chunk_count = count
    rec.stream_body = None


ASSEMBLERS = {"completion": assemble_completion, "stream": assemble_stream}
