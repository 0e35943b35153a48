"""Values as the dashboard writes them: local times (as the CLI shows them), milliseconds,
a request's status, a message's first line."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from ..messages import content_text


def _parse(ts: str | None) -> datetime | None:
    if not ts:
        return None
    try:
        return datetime.fromisoformat(ts).astimezone()
    except ValueError:
        return None


def local_time(ts: str | None, today: datetime | None = None) -> str:
    """`HH:MM:SS` local time if `ts` is today, else `YYYY-MM-DD HH:MM:SS`; `-` when unset."""
    when = _parse(ts)
    if when is None:
        return ts or "-"
    today = today or datetime.now().astimezone()
    return when.strftime("%H:%M:%S" if when.date() == today.date() else "%Y-%m-%d %H:%M:%S")


def full_time(ts: str | None) -> str:
    """Local date and time with milliseconds and the zone; `-` when unset."""
    when = _parse(ts)
    if when is None:
        return ts or "-"
    return when.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + when.strftime(" %Z").rstrip()


def ms(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f} ms" if value >= 100 else f"{value:.1f} ms"


def status(row: dict[str, Any]) -> str:
    """`200`, or the status and the outcome when it is not ok (`404 rejected`)."""
    code = "-" if row.get("status") is None else str(row["status"])
    outcome = row.get("outcome")
    return code if outcome in (None, "ok") else f"{code} {outcome}"


def tokens(row: dict[str, Any]) -> str:
    p, c = row.get("prompt_tokens"), row.get("completion_tokens")
    return "-" if p is None and c is None else f"{'-' if p is None else p}/{'-' if c is None else c}"


def first_line(text: str | None, limit: int = 160) -> str:
    """The first non-blank line of `text`, cut to `limit` characters."""
    for line in (text or "").splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= limit else line[: limit - 1] + "…"
    return ""


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
