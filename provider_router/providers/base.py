"""The provider interface: what the API layer hands a provider and what it gets back.

Providers translate; they hold no session state. A pass-through provider returns the
upstream's bytes to forward verbatim; a translating one returns a stream of `Event`s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Mapping, Protocol, TypeGuard, Union

from ..errors import ApiError

if TYPE_CHECKING:
    from .http import Upstream


@dataclass(slots=True)
class ChatCall:
    """One upstream call, as decided by the API layer and the thread logic."""

    body: dict[str, Any]  # the client's validated body, `model` already the upstream model
    raw: bytes  # `body` encoded: what a pass-through provider sends
    stream: bool
    upstream_model: str
    # Threaded upstreams only (placed by threads.py): where the turn continues from.
    chat_id: str | None = None
    parent_id: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)  # the messages not yet upstream


class ChatGone(Exception):
    """The upstream no longer knows the chat (expired, deleted): the thread must be rebuilt."""


class ChatBusy(ApiError):
    """The upstream still counts a turn in the chat as running ("The chat is in progress!"):
    transient, so the turn waits and is sent again; answered as it is if never caught."""

    def __init__(self, details: str) -> None:
        super().__init__(429, f"upstream chat busy: {details}", code="upstream_chat_busy", outcome="upstream_error", retryable=True)


@dataclass(slots=True)
class Started:
    """The upstream accepted the turn: its chat and the id its reply will have."""

    chat_id: str | None
    reply_id: str | None


@dataclass(slots=True)
class Delta:
    content: str = ""
    reasoning: str = ""


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class Finish:
    """The reply completed; only a completed reply may become a thread's parent."""

    reason: str = "stop"


Event = Union[Started, Delta, Usage, Finish]


@dataclass(slots=True)
class UpstreamReply:
    """Either `raw` (forward verbatim with `status`/`headers`) or `events` (render as OpenAI)."""

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    raw: AsyncIterator[bytes] | None = None
    # Set with `raw`: the whole body in one await, for replies that are not forwarded as they arrive.
    read: Callable[[], Awaitable[bytes]] | None = None
    events: AsyncIterator[Event] | None = None
    close: Callable[[], None] = lambda: None
    queue_ms: float = 0.0  # how long the call waited for a connection slot to the upstream


class Provider(Protocol):
    name: str
    threaded: bool  # True: the upstream keeps the thread; send only new messages (a `ThreadedProvider`)
    forwards: bool  # True: it serves any OpenAI endpoint by forwarding it (a `Forwarder`)
    upstream: Upstream | None  # its HTTP client (connection slots, for /metrics); None: no network

    async def chat(self, call: ChatCall) -> UpstreamReply:
        """Start the upstream call. Raise `ApiError` for failures before anything was received."""
        ...

    async def close(self) -> None: ...


class ThreadedProvider(Provider, Protocol):
    delete_chats: bool  # delete upstream chats when their session ends

    async def new_chat(self, model: str) -> str:
        """Create an upstream chat; its id."""
        ...

    async def delete_chat(self, chat_id: str) -> None:
        """Delete an upstream chat (used when sessions expire, if configured)."""
        ...


class Forwarder(Provider, Protocol):
    async def call(self, method: str, path: str, body: bytes | None = None, stream: bool = False) -> UpstreamReply:
        """Any endpoint under the provider's base URL (`path` starts with `/`), forwarded as it is."""
        ...


def is_threaded(p: Provider | None) -> TypeGuard[ThreadedProvider]:
    return p is not None and p.threaded


def forwards(p: Provider | None) -> TypeGuard[Forwarder]:
    return p is not None and p.forwards
