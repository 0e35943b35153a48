"""provider-router: a local OpenAI-compatible proxy with conversation threading and a SQLite log."""

from __future__ import annotations

from .app import create_app
from .config import Config, ConfigError, load_config, parse_config

__all__ = ["Config", "ConfigError", "create_app", "load_config", "parse_config"]
__version__ = "0.1.0"
