"""Upstream dialects behind one small interface (`base.Provider`)."""

from __future__ import annotations

import aiohttp

from ..config import ProviderConfig
from .base import (
    ChatBusy, ChatCall, ChatGone, Delta, Event, Finish, Forwarder, Provider, Started, ThreadedProvider, UpstreamReply, Usage, forwards,
    is_threaded,
)  # fmt: skip
from .echo import EchoProvider
from .http import QueueObserver, Upstream
from .openai import OpenAIProvider


def build_provider(cfg: ProviderConfig, session: aiohttp.ClientSession, on_queue: QueueObserver | None = None) -> Provider:
    """The provider object for one `providers[]` entry, on the app's upstream `session`;
    `on_queue(provider, ms)` hears how long each upstream call waited for a connection slot."""
    if cfg.type == "openai":
        return OpenAIProvider(cfg, Upstream(session, cfg, on_queue))
    if cfg.type == "echo":
        return EchoProvider(cfg)
    if cfg.type == "qwen":
        from .qwen import QwenProvider

        return QwenProvider(cfg, Upstream(session, cfg, on_queue))
    raise ValueError(f"unknown provider type {cfg.type!r}")


__all__ = [
    "ChatBusy", "ChatCall", "ChatGone", "Delta", "Event", "Finish", "Forwarder", "Provider", "Started", "ThreadedProvider",
    "UpstreamReply", "Usage", "build_provider", "forwards", "is_threaded",
]
