"""Reading chat messages as text: shared by validation, the log and the providers.

A message's `content` is a string, or an array of parts of which only string `text` counts.
"""

from __future__ import annotations

from typing import Any


def content_text(content: Any) -> str:
    """The text of a message's content (a string, or the text parts of an array, one per line)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def said_text(m: Any) -> str:
    """What a message said, as listings show it: its text, or when it has none its tool
    calls as `name(arguments)`."""
    if not isinstance(m, dict):
        return ""
    text = content_text(m.get("content"))
    if not text and isinstance(m.get("tool_calls"), list):
        calls = [tc.get("function") for tc in m["tool_calls"] if isinstance(tc, dict)]
        text = " ".join(f"{fn.get('name')}({fn.get('arguments')})" for fn in calls if isinstance(fn, dict))
    return text
