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
