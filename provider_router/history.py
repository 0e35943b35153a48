"""A client's message history as the conversation tree sees it: each message's canonical
form and its chained key (`node_key`), the session fingerprint of its opening, and the text
search indexes of it.

Pure functions (hashlib and orjson only): the request path keys a threaded turn's history
with them, and the log writer process keys every message it stores.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import orjson


def canon(m: dict[str, Any]) -> bytes:
    """A message of a session's opening, for its fingerprint: role and content (other
    fields vary between clients that resend the same message)."""
    role, content = m.get("role"), m.get("content")
    if isinstance(content, str):
        body = content.strip().encode()
    elif content is None:
        body = b""
    else:
        body = orjson.dumps(content, option=orjson.OPT_SORT_KEYS)
    return str(role).encode() + b"\x1f" + body


def fingerprint(client: str, provider: str, upstream_model: str, messages: Sequence[dict[str, Any]]) -> str:
    """Who, which route, and the opening: system messages up to and including the first user message."""
    parts = [client.encode(), provider.encode(), upstream_model.encode()]
    for m in messages:
        parts.append(canon(m))
        if m.get("role") == "user":
            break
    return hashlib.blake2b(b"\x1e".join(parts), digest_size=16).hexdigest()


# -- the conversation tree ---------------------------------------------------------------------
# A message's node in the tree is keyed by SHA-256(parent key + its canonical form). The
# canonical form is what identifies a message when a client resends it: role, content,
# tool calls, tool call id, name. Reasoning and refusal are kept in the node's body but not
# in its key: clients routinely drop reasoning when they resend a reply (some APIs require
# it), and the thread must still continue from that reply.
_KEY_FIELDS = ("tool_call_id", "name")


def _tool_call(tc: Any) -> Any:
    if not isinstance(tc, dict):
        return tc
    out = {k: v for k, v in tc.items() if v is not None and k != "index"}
    fn = out.get("function")
    if isinstance(fn, dict):
        out["function"] = {k: v for k, v in fn.items() if v is not None}
    return out


def canonical(m: dict[str, Any]) -> dict[str, Any]:
    """The part of a message that identifies it in the tree (see above)."""
    out: dict[str, Any] = {"role": m.get("role")}
    content = m.get("content")
    if isinstance(content, str):
        content = content.strip()
    if content not in (None, "", []):
        out["content"] = content
    calls = m.get("tool_calls")
    if isinstance(calls, list) and calls:
        out["tool_calls"] = [_tool_call(tc) for tc in calls]
    elif calls not in (None, []):
        out["tool_calls"] = calls
    fc = m.get("function_call")
    if fc is not None:
        out["function_call"] = fc
    for k in _KEY_FIELDS:
        v = m.get(k)
        if v not in (None, ""):
            out[k] = v
    return out


def node_key(parent: bytes, m: dict[str, Any]) -> bytes:
    """The tree key of message `m` under the node keyed `parent` (b"" at the root): 16
    bytes of SHA-256 (hardware-accelerated on current CPUs; the log writer keys every new
    message with it)."""
    return hashlib.sha256(parent + orjson.dumps(canonical(m), option=orjson.OPT_SORT_KEYS)).digest()[:16]


def node_keys(messages: Sequence[dict[str, Any]]) -> list[bytes]:
    """`out[i]` is the tree key of `messages[i]` reached through `messages[:i]`."""
    out: list[bytes] = []
    h = b""
    for m in messages:
        h = node_key(h, m)
        out.append(h)
    return out


def message_text(m: Any) -> str:
    """What full-text search indexes of a message: its text, and its tool calls' names and
    arguments (what an agent did is searched as much as what it said)."""
    if not isinstance(m, dict):
        return ""
    content = m.get("content")
    if isinstance(content, str):
        parts = [content]
    elif isinstance(content, list):
        parts = [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    else:
        parts = []
    refusal = m.get("refusal")
    if isinstance(refusal, str):
        parts.append(refusal)
    calls = m.get("tool_calls")
    for tc in calls if isinstance(calls, list) else ():
        fn = tc.get("function") if isinstance(tc, dict) else None
        if isinstance(fn, dict):
            parts += [v for v in (fn.get("name"), fn.get("arguments")) if isinstance(v, str)]
    return "\n".join(parts)
