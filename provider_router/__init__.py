"""provider-router: a local OpenAI-compatible proxy with conversation threading and a SQLite log."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app
    from .config import Config, ConfigError, load_config, parse_config

__all__ = ["Config", "ConfigError", "create_app", "load_config", "parse_config"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Imported on first use: the log writer process imports submodules and should not pay
    # for aiohttp on start.
    if name == "create_app":
        from .app import create_app

        return create_app
    if name in ("Config", "ConfigError", "load_config", "parse_config"):
        from . import config

        return getattr(config, name)
    raise AttributeError(name)
