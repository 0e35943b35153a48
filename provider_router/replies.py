"""What a forwarded OpenAI chat reply amounts to, for the log: a `chat.completion` object
(choices with their messages: text, reasoning, refusal, tool calls with their assembled
arguments; finish reasons; usage), read from a non-stream body or a complete SSE body.

Domain, below the store: the log writer process assembles replies with it, the readers
show their text; never on the request path. One reading of a stream, the SSE parser's: a
body framed as OpenAI-compatible servers frame it is read in one orjson call, which gives
the same events (a property test holds them to it) at a third of the cost (bench/README).
"""

from __future__ import annotations

from typing import Any

import orjson

from .sse import SSEParser

_STRING_FIELDS = ("content", "reasoning_content", "reasoning", "refusal")


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


def stream_events(data: bytes) -> list[Any]:
    """The JSON payloads of a complete SSE body, as the SSE parser would find them; payloads
    that are not JSON are skipped."""
    usual = usual_array(data)
    if usual is not None:
        try:
            events = orjson.loads(usual[0])
            if len(events) == usual[1]:
                return events  # type: ignore[no-any-return]
        except orjson.JSONDecodeError:
            pass
    out = []
    for ev in SSEParser().feed(data + b"\n\n"):
        if ev.data and ev.data != "[DONE]":
            try:
                out.append(orjson.loads(ev.data))
            except orjson.JSONDecodeError:
                continue
    return out


def _merge_tool_calls(calls: dict[int, dict[str, Any]], deltas: Any) -> None:
    """Tool call pieces into whole calls, by their `index` (a piece without one: a new call
    if it has an id, else the last call)."""
    for d in deltas if isinstance(deltas, list) else ():
        if not isinstance(d, dict):
            continue
        i = d.get("index")
        if not isinstance(i, int) or isinstance(i, bool):
            i = (max(calls) + 1 if calls else 0) if d.get("id") or not calls else max(calls)
        tc = calls.setdefault(i, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        if d.get("id") and not tc["id"]:
            tc["id"] = d["id"]
        if isinstance(d.get("type"), str):
            tc["type"] = d["type"]
        fn = d.get("function")
        if isinstance(fn, dict):
            for k in ("name", "arguments"):
                if isinstance(fn.get(k), str):
                    tc["function"][k] += fn[k]


def assemble_stream(data: bytes) -> dict[str, Any]:
    """The `chat.completion` a complete chat SSE body amounts to; `_events` is how many
    events it had."""
    events = [e for e in stream_events(data) if isinstance(e, dict)]
    out: dict[str, Any] = {"object": "chat.completion"}
    choices: dict[int, dict[str, Any]] = {}
    for ev in events:
        for k in ("id", "created", "model", "system_fingerprint"):
            if k not in out and ev.get(k) is not None:
                out[k] = ev[k]
        if isinstance(ev.get("usage"), dict):
            out["usage"] = ev["usage"]
        evc = ev.get("choices")
        for ch in evc if isinstance(evc, list) else ():
            if not isinstance(ch, dict):
                continue
            i = ch.get("index", 0)
            i = i if isinstance(i, int) and not isinstance(i, bool) else 0
            acc = choices.setdefault(i, {"parts": {}, "tool_calls": {}, "finish_reason": None, "role": "assistant"})
            delta = ch.get("delta")
            if isinstance(delta, dict):
                if isinstance(delta.get("role"), str):
                    acc["role"] = delta["role"]
                for k in _STRING_FIELDS:
                    v = delta.get(k)
                    if isinstance(v, str):
                        acc["parts"].setdefault(k, []).append(v)
                _merge_tool_calls(acc["tool_calls"], delta.get("tool_calls"))
            if isinstance(ch.get("finish_reason"), str):
                acc["finish_reason"] = ch["finish_reason"]
    out["choices"] = []
    for i in sorted(choices):
        acc = choices[i]
        message: dict[str, Any] = {"role": acc["role"]}
        parts = {k: "".join(v) for k, v in acc["parts"].items()}
        message["content"] = parts.pop("content", None) or (None if acc["tool_calls"] else "")
        message.update({k: v for k, v in parts.items() if v})
        if acc["tool_calls"]:
            message["tool_calls"] = [acc["tool_calls"][k] for k in sorted(acc["tool_calls"])]
        out["choices"].append({"index": i, "message": message, "finish_reason": acc["finish_reason"]})
    out["_events"] = len(events)
    return out


def completion(body: bytes) -> dict[str, Any] | None:
    """A non-stream `chat.completion` body, if it is one."""
    obj = completion_like(body)
    return obj if obj is not None and isinstance(obj.get("choices"), list) else None


def finished(choices: list[dict[str, Any]]) -> bool:
    """Whether every choice of an assembled reply has a finish reason."""
    return bool(choices) and all(isinstance(c, dict) and c.get("finish_reason") for c in choices)


# -- the other endpoints -----------------------------------------------------------------------
_RESPONSE_ENDS = ("response.completed", "response.incomplete", "response.failed")


def responses_reply(data: bytes, stream: bool) -> dict[str, Any] | None:
    """The final `response` object of a Responses API answer: the body, or the one a
    stream's `response.completed` (or incomplete, failed) event carries; for a stream cut
    before that, the text its deltas brought, as an incomplete response."""
    if not stream:
        obj = completion_like(data)
        return obj if obj is not None and isinstance(obj.get("output"), list) else None
    text: list[str] = []
    events = [e for e in stream_events(data) if isinstance(e, dict)]
    for ev in reversed(events):
        if ev.get("type") in _RESPONSE_ENDS and isinstance(ev.get("response"), dict):
            return dict(ev["response"], _events=len(events))  # type: ignore[arg-type]
    for ev in events:
        if ev.get("type") == "response.output_text.delta" and isinstance(ev.get("delta"), str):
            text.append(ev["delta"])
    message = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "".join(text)}]}
    return {"object": "response", "status": "incomplete", "output": [message], "_events": len(events)}


def text_completion_reply(data: bytes, stream: bool) -> dict[str, Any] | None:
    """A legacy `text_completion`: the body, or what a stream's chunks amount to (each
    choice's text, finish reason; usage)."""
    if not stream:
        return completion_like(data)
    events = [e for e in stream_events(data) if isinstance(e, dict)]
    out: dict[str, Any] = {"object": "text_completion"}
    choices: dict[int, dict[str, Any]] = {}
    for ev in events:
        for k in ("id", "created", "model"):
            if k not in out and ev.get(k) is not None:
                out[k] = ev[k]
        if isinstance(ev.get("usage"), dict):
            out["usage"] = ev["usage"]
        for ch in ev.get("choices") if isinstance(ev.get("choices"), list) else ():
            if not isinstance(ch, dict):
                continue
            i = ch.get("index", 0) if isinstance(ch.get("index"), int) else 0
            acc = choices.setdefault(i, {"text": "", "index": i, "finish_reason": None})
            acc["text"] += ch["text"] if isinstance(ch.get("text"), str) else ""
            if isinstance(ch.get("finish_reason"), str):
                acc["finish_reason"] = ch["finish_reason"]
    out["choices"] = [choices[i] for i in sorted(choices)]
    out["_events"] = len(events)
    return out


def completion_like(body: bytes) -> dict[str, Any] | None:
    """A body that is a JSON object, as one."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None
