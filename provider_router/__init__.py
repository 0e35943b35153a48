"""provider-router: a local OpenAI-compatible proxy with conversation threading and a SQLite log.

Layers, each importing only those before it (tests/test_layers.py): `config`; the domain
(`errors`, `messages`, `history`, `sse`, `replies`, `routing`, `records`, `redact`,
`logsetup`, `rowtext`); `store/` (the SQLite log, its writer process, sessions' rows); `providers/`;
`sessions` and `threads`; the HTTP API (`api/`, `middleware`, `state`, `metrics`, the dashboard `ui/`); `app`, `serve`, `cli/`.

A chat request: `middleware.edge` (id, client key, the record) -> `api/chat.py` (intake,
then attempts over the routes) -> `threads.place` (the session from `sessions.join`, what to send) ->
`providers/*` (the upstream call) -> `api/relay.py` or `api/render.py` (to the client as it
arrives) -> `threads.record` (the completed reply) -> `api/outcome.settle` (the row's
status and outcome) -> the log writer.
"""

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
