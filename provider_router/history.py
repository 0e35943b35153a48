"""A client's message history as the thread sees it: canonical messages, the chained
hashes of its prefixes, and where it continues a recorded reply.

Pure functions (hashlib and orjson only): the request path uses them to decide what a
threaded upstream is sent, and the log writer process uses them to thread the log of
stateless upstreams after the fact.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence, TypeVar

import orjson

T = TypeVar("T")
ASSISTANT = b"assistant\x1f"


def canon(m: dict[str, Any]) -> bytes:
    """A message as the thread sees it: role and content. Other fields (name, refusal,
    reasoning) vary between clients that resend the same message, so they are left out."""
    return canon_of(m.get("role"), m.get("content"))


def canon_of(role: Any, content: Any) -> bytes:
    """`canon` of a message with this role and content."""
    if isinstance(content, str):
        body = content.strip().encode()
    elif content is None:
        body = b""
    else:
        body = orjson.dumps(content, option=orjson.OPT_SORT_KEYS)
    return str(role).encode() + b"\x1f" + body


def _h(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def prefix_hashes(canons: Sequence[bytes]) -> list[bytes]:
    """`out[i]` identifies `messages[: i + 1]`: a chain, so equal prefixes hash equal."""
    out: list[bytes] = []
    h = b""
    for c in canons:
        h = _h(h + c)
        out.append(h)
    return out


def reply_hash(prefix: bytes, text: str) -> bytes:
    """The hash the client's next request will have for its history plus this reply."""
    return _h(prefix + canon({"role": "assistant", "content": text}))


def turn_number(canons: Sequence[bytes]) -> int:
    """1 + the assistant messages already in the history."""
    return sum(c.startswith(ASSISTANT) for c in canons) + 1


def fingerprint(client: str, provider: str, upstream_model: str, messages: Sequence[dict[str, Any]]) -> str:
    """Who, which route, and the opening: system messages up to and including the first user message."""
    parts = [client.encode(), provider.encode(), upstream_model.encode()]
    for m in messages:
        parts.append(canon(m))
        if m.get("role") == "user":
            break
    return hashlib.blake2b(b"\x1e".join(parts), digest_size=16).hexdigest()


def place(canons: Sequence[bytes], hashes: Sequence[bytes], lookup: Callable[[str], T | None]) -> tuple[int, T | None]:
    """The longest prefix of the history that ends at a recorded reply: (its length, the turn).
    `lookup` maps a prefix hash (hex) to the recorded turn, if any."""
    for k in range(len(canons) - 1, 0, -1):
        if canons[k - 1].startswith(ASSISTANT):
            t = lookup(hashes[k - 1].hex())
            if t is not None:
                return k, t
    return 0, None


# -- the conversation tree ---------------------------------------------------------------------
# A message's node in the tree is keyed by blake2b(parent key + its canonical form). The
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
