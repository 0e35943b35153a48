"""Values as the dashboard writes them: local times (as the CLI shows them), milliseconds,
a request's status, a message's first line."""

from __future__ import annotations

from typing import Any

import orjson

from ..messages import content_text
from ..rowtext import first_line, lineage, local_time, parse_ts, status, tokens  # noqa: F401 (as the CLI writes them)


def full_time(ts: str | None) -> str:
    """Local date and time with milliseconds and the zone; `-` when unset."""
    when = parse_ts(ts)
    if when is None:
        return ts or "-"
    return when.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + when.strftime(" %Z").rstrip()


def ms(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f} ms" if value >= 100 else f"{value:.1f} ms"


def message_text(message: Any) -> str:
    """A message's text, for one-line views: its content, else its tool calls, else its refusal."""
    if not isinstance(message, dict):
        return str(message)
    text = content_text(message.get("content"))
    if not text and isinstance(message.get("content"), list):
        text = " ".join(f"[{p.get('type', 'part')}]" for p in message["content"] if isinstance(p, dict))
    if not text:
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            text = " ".join(call_line(c) for c in calls)
    if not text and message.get("refusal"):
        text = f"(refused) {message['refusal']}"
    return text


def call_line(call: Any) -> str:
    """`-> name(arguments)`: what an agent asked a tool to do."""
    fn = call.get("function") if isinstance(call, dict) else None
    fn = fn if isinstance(fn, dict) else {}
    return f"-> {fn.get('name', '?')}({fn.get('arguments', '')})"


def pretty_json(value: Any) -> str:
    """JSON indented for reading; a string holding JSON (tool arguments) is parsed first."""
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    return orjson.dumps(value, option=orjson.OPT_INDENT_2, default=str).decode()
