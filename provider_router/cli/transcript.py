"""Messages as text: a request's conversation as a transcript (tool calls as
`-> name(arguments) [call id]`, tool results under their call id), its replies, and a whole
request as `logs show` prints it.
"""

from __future__ import annotations

from typing import Any

import orjson

from .. import rowtext
from ..as_chat import choice_message, reply_message, shown
from .output import fields, full_time, json_doc, json_line, section, status


def content_text(content: Any) -> str:
    """A message's content as text: strings as-is, parts joined, images as `[image]`."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict):
                parts.append(str(part))
            elif part.get("type") == "text" or "text" in part:
                parts.append(str(part.get("text", "")))
            else:
                parts.append(f"[{part.get('type', 'part')}]")
        return "\n".join(parts)
    return orjson.dumps(content).decode()


def transcript_lines(role: str, text: str, width: int = 11) -> list[str]:
    """`role: text`, continuation lines indented under the text."""
    lines = text.splitlines() or [""]
    head = f"{role:>{width - 2}}: "
    return [head + lines[0]] + [" " * width + line for line in lines[1:]]


def tool_call_line(call: Any) -> str:
    """`-> name(arguments) [call id]`: what an agent asked a tool to do."""
    fn = call.get("function") if isinstance(call, dict) else None
    fn = fn if isinstance(fn, dict) else {}
    line = f"-> {fn.get('name', '?')}({fn.get('arguments', '')})"
    return line + (f" [{call['id']}]" if isinstance(call, dict) and call.get("id") else "")


def message_lines(msg: Any) -> list[str]:
    """One message as transcript lines: its text, then its tool calls; a tool result's role
    names the call it answers, so calls and results can be matched by eye."""
    if not isinstance(msg, dict):
        return transcript_lines("?", str(msg))
    role = str(msg.get("role", "?"))
    if msg.get("name"):
        role += f" ({msg['name']})"
    if msg.get("tool_call_id"):
        role += f" [{msg['tool_call_id']}]"
    text = content_text(msg.get("content"))
    for call in msg.get("tool_calls") or []:
        text += ("\n" if text else "") + tool_call_line(call)
    fc = msg.get("function_call")  # the deprecated single-call form
    if isinstance(fc, dict):
        text += ("\n" if text else "") + tool_call_line({"function": fc})
    return transcript_lines(role, text)


def message_transcript(messages: Any) -> list[str]:
    """The request's messages, one speaker per block, tool calls spelled out."""
    if not isinstance(messages, list):
        return ["  (no messages)"]
    return [line for msg in messages for line in message_lines(msg)]


def reply_transcript(choice: dict[str, Any]) -> list[str]:
    """One choice of the response: reasoning, text, refusal, tool calls, finish reason."""
    msg = choice_message(choice) or {}  # a legacy completion's text, as a message
    out: list[str] = []
    reasoning = msg.get("reasoning_content") or msg.get("reasoning")
    if reasoning:
        out += transcript_lines("reasoning", str(reasoning))
    out += message_lines({**msg, "role": msg.get("role") or "assistant"})
    if msg.get("refusal"):
        out += transcript_lines("refusal", str(msg["refusal"]))
    out += transcript_lines("finish", str(choice.get("finish_reason") or "-"))
    return out


def _request_fields(r: dict[str, Any]) -> list[str]:
    stream = {None: None, 0: "no", 1: "yes"}.get(r.get("stream"), r.get("stream"))
    if stream == "yes" and r.get("chunk_count") is not None:
        stream += f" ({r['chunk_count']} chunks)"
    lineage = rowtext.lineage(r)
    return fields([
        ("received", full_time(r.get("received_at"))),
        ("finished", full_time(r.get("finished_at"))),
        ("method", f"{r.get('method')} {r.get('path')}"),
        ("client", r.get("client")),
        ("user agent", r.get("user_agent")),
        ("model", r.get("model")),
        ("provider", r.get("provider")),
        ("upstream model", r.get("upstream_model")),
        ("stream", stream),
        ("status", status(r)),
        ("finish reason", r.get("finish_reason")),
        ("ttfb", None if r.get("ttfb_ms") is None else f"{r['ttfb_ms']:.1f} ms"),
        ("duration", None if r.get("duration_ms") is None else f"{r['duration_ms']:.1f} ms"),
        ("usage", rowtext.usage(r)),
        ("session", r.get("session_id")),
        ("turn", r.get("turn")),
        ("chat_id", r.get("chat_id")),
        ("upstream lineage", lineage),
        # Only when something was: what, and the text itself marks where it was cut.
        *([("stored cut", r["cut"])] if r.get("cut") else []),
    ])


def render_request(r: dict[str, Any]) -> list[str]:
    """One request in full: fields, the request as a transcript (tool calls and results
    included), each choice's reply, usage, what was cut, upstream attempts."""
    request, response = r.get("request"), r.get("response")
    out = [f"request {r['id']}", *_request_fields(r)]
    if r.get("error"):
        out += [section("error"), str(r["error"])]
    if isinstance(request, dict):
        messages, params = shown(r.get("path"), request)  # a Responses or legacy completion body: read as chat
        out += [section("request"), *message_transcript(messages)]
        if params:
            out.append("params: " + json_line(params))
    elif request is not None:
        out += [section("request body (not a chat request)"), request if isinstance(request, str) else json_doc(request)]
    choices = response.get("choices") if isinstance(response, dict) else None
    if isinstance(choices, list) and choices:
        for i, choice in enumerate(choices):
            title = "reply" if len(choices) == 1 else f"reply {i + 1} of {len(choices)}"
            out += [section(title), *reply_transcript(choice if isinstance(choice, dict) else {})]
    elif r.get("path") == "/v1/responses" and isinstance(response, dict) and (answer := reply_message("responses", response)) is not None:
        out += [section("reply"), *message_lines(answer), *transcript_lines("finish", str(response.get("status") or "-"))]
    elif response is not None:
        out += [section("response body"), response if isinstance(response, str) else json_doc(response)]
    if r.get("attempts"):
        out += [section("upstream attempts")]
        out += [json_line(a) for a in r["attempts"]] if isinstance(r["attempts"], list) else [str(r["attempts"])]
    return out
