"""A stored request's values as text, the same in the CLI and the dashboard: its times in
local time, its status with the outcome, its tokens, a text's first line."""

from __future__ import annotations

from datetime import datetime
from typing import Any

# Every outcome a request row can have (the CLI's --outcome and the dashboard's filter).
OUTCOMES = ("ok", "rejected", "upstream_error", "timeout", "client_disconnected", "shutdown", "error")


def upstream_chat(r: dict[str, Any]) -> str | None:
    """The threaded upstream's chat a request row continued, if any (a stateless
    upstream's rows carry their session's id as chat id: no chat of the upstream's)."""
    chat = r.get("chat_id")
    return chat if chat and chat != r.get("session_id") else None


def lineage(r: dict[str, Any], arrow: str = "->") -> str | None:
    """Where a request row went in its upstream chat (`parent -> reply`, `(new chat)` for a
    chat's first turn); for a stateless upstream only the upstream's reply id."""
    parent, reply = r.get("parent_id"), r.get("reply_id")
    if upstream_chat(r) is None:
        return f"reply {reply}" if reply else None
    return f"{parent or '(new chat)'} {arrow} {reply or '-'}" if parent or reply else None


def parse_ts(ts: str | None) -> datetime | None:
    """A stored ISO time in local time; None when unset or unreadable."""
    if not ts:
        return None
    try:
        return datetime.fromisoformat(ts).astimezone()
    except ValueError:
        return None


def local_time(ts: str | None, *, today: datetime | None = None) -> str:
    """`HH:MM:SS` local time if `ts` is today, else `YYYY-MM-DD HH:MM:SS`; `-` when unset."""
    when = parse_ts(ts)
    if when is None:
        return ts or "-"
    today = today or datetime.now().astimezone()
    return when.strftime("%H:%M:%S" if when.date() == today.date() else "%Y-%m-%d %H:%M:%S")


def or_dash(value: Any) -> str:
    return "-" if value is None else str(value)


def tokens(row: dict[str, Any]) -> str:
    """`in/out` tokens of a request row, `?` for a side the upstream did not report (an
    embeddings call has no out side: its input tokens alone)."""
    p, c = row.get("prompt_tokens"), row.get("completion_tokens")
    if (p is None and c is None) or row.get("path") == "/v1/embeddings":
        return or_dash(p if p is not None else row.get("total_tokens"))
    return f"{p if p is not None else '?'}/{c if c is not None else '?'}"


def usage(row: dict[str, Any]) -> str | None:
    """A request row's token counts spelled out (`prompt 8, completion -, total 8`), or None
    when the upstream reported none."""
    if all(row.get(k) is None for k in ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens")):
        return None
    out = f"prompt {or_dash(row.get('prompt_tokens'))}, completion {or_dash(row.get('completion_tokens'))}, total {or_dash(row.get('total_tokens'))}"
    return out + (f", cached {row['cached_tokens']}" if row.get("cached_tokens") is not None else "")


def status(row: dict[str, Any]) -> str:
    """The HTTP status, with the outcome when it is not `ok` (`404 rejected`)."""
    code = or_dash(row.get("status"))
    outcome = row.get("outcome")
    return code if outcome in (None, "ok") else f"{code} {outcome}"


def first_line(text: str | None, limit: int | None = None) -> str:
    """The first non-blank line, with tabs and control characters made spaces, cut to
    `limit` characters (an ellipsis marking the cut)."""
    for line in (text or "").splitlines():
        if line.strip():
            line = "".join(c if c.isprintable() else " " for c in line.strip())
            return line if limit is None or len(line) <= limit else line[: limit - 1] + "…"
    return ""


def prompt_line(row: dict[str, Any], limit: int | None = None) -> str:
    """The prompt's first line; for a request with none that is not a chat (an embeddings
    call, a model lookup), what it asked for: `POST /v1/embeddings`."""
    text = first_line(row.get("prompt_text"), limit)
    if not text and row.get("path") and row["path"] != "/v1/chat/completions":
        return first_line(f"{row.get('method') or ''} {row['path']}", limit)
    return text
