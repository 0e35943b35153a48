"""Upstream dialects behind one small interface (`base.Provider`)."""

from __future__ import annotations

from ..config import ProviderConfig
from .base import ChatCall, ChatGone, Delta, Event, Finish, Provider, Started, UpstreamReply, Usage
from .client import HttpClient
from .echo import EchoProvider
from .openai import OpenAIProvider


def build_provider(cfg: ProviderConfig, http: HttpClient) -> Provider:
    """The provider object for one `providers[]` entry."""
    if cfg.type == "openai":
        return OpenAIProvider(cfg, http)
    if cfg.type == "echo":
        return EchoProvider(cfg)
    if cfg.type == "qwen":
        from .qwen import QwenProvider

        return QwenProvider(cfg, http)
    raise ValueError(f"unknown provider type {cfg.type!r}")


__all__ = [
    "ChatCall", "ChatGone", "Delta", "Event", "Finish", "Provider", "Started", "UpstreamReply", "Usage", "build_provider",
]
