"""The built-in `echo` provider: a deterministic reply derived from the conversation.

It needs no key and no network, so the shipped config answers out of the box.
"""

from __future__ import annotations

import hashlib
from typing import Any, AsyncIterator

from ..config import ProviderConfig
from ..messages import content_text
from .base import ChatCall, Delta, Event, Finish, Started, UpstreamReply, Usage


def echo_reply(messages: list[dict[str, Any]]) -> str:
    """`"echo #<turn> [<digest of the whole history>]: <last user message>"`."""
    users = [m for m in messages if m.get("role") == "user"]
    last = content_text(users[-1].get("content")) if users else ""
    digest = hashlib.sha256(repr([(m.get("role"), content_text(m.get("content"))) for m in messages]).encode())
    return f"echo #{len(users)} [{digest.hexdigest()[:8]}]: {last}"


class EchoProvider:
    threaded = False
    forwards = False
    upstream = None

    def __init__(self, cfg: ProviderConfig) -> None:
        self.name = cfg.name

    async def chat(self, call: ChatCall) -> UpstreamReply:
        return UpstreamReply(events=self._events(call))

    async def _events(self, call: ChatCall) -> AsyncIterator[Event]:
        messages = call.body["messages"]
        reply = echo_reply(messages)
        digest = hashlib.sha256(reply.encode()).hexdigest()[:24]
        yield Started(chat_id=None, reply_id=f"echo-{digest}")
        words = reply.split(" ")
        for i, word in enumerate(words):
            yield Delta(content=word if i == 0 else " " + word)
        prompt = sum(len(content_text(m.get("content")).split()) for m in messages)
        yield Usage(prompt_tokens=prompt, completion_tokens=len(words))
        yield Finish("stop")

    async def close(self) -> None:
        return None
