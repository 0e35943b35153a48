"""Shared fixtures: the proxy served on a real loopback socket with a real SQLite file, fake
upstreams on loopback, and the official `openai` SDK as the client.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiosqlite
import openai
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from provider_router import create_app, parse_config
from provider_router.state import STATE, State
from provider_router.store import queries
from tests.daemon import spawn  # noqa: F401 - the `spawn` fixture: real daemon processes
from tests.postgres import pg_db, postgres  # noqa: F401 - a real PostgreSQL server, one database per test
from tests.fakes.openai import OpenAIFake
from tests.fakes.qwen import QwenFake

UPSTREAM_KEY = "sk-upstream-test"
QWEN_TOKEN = "qwen-token-test"


@pytest.fixture(autouse=True)
def _terminal_width_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's tables fit `COLUMNS` when it is set; a test worker process (pytest-xdist)
    inherits one (80). Tests that need a width set it themselves."""
    monkeypatch.delenv("COLUMNS", raising=False)


class Proxy:
    """A running proxy: its URL, an SDK client factory, and its log database."""

    def __init__(self, server: TestServer, app: web.Application, db_path: Path) -> None:
        self.server = server
        self.app = app
        self.db_path = db_path
        self.url = str(server.make_url("")).rstrip("/")

    @property
    def state(self) -> State:
        return self.app[STATE]

    def sdk(self, api_key: str = "no-key", **kw: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **kw)

    async def drained(self) -> None:
        assert self.state.writer is not None
        await self.state.writer.drained()

    async def record(self, request_id: str) -> dict[str, Any]:
        """One request as the log keeps it: its row with `request` and `response` rebuilt
        from the conversation tree (what `logs show ID --json` prints)."""
        await self.drained()
        conn = await aiosqlite.connect(self.db_path)
        try:
            found = await queries.get_request(conn, request_id)
        finally:
            await conn.close()
        assert found is not None, request_id
        return found

    async def rows(self, sql: str = "SELECT * FROM request_log ORDER BY id", *params: Any) -> list[dict[str, Any]]:
        """Rows from the log database (after the writer has committed everything queued)."""
        await self.drained()
        conn = sqlite3.connect(self.db_path)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(sql, params)]
        finally:
            conn.close()


ProxyFactory = Callable[..., Awaitable[Proxy]]


def base_config(upstream_url: str | None = None) -> dict[str, Any]:
    providers: list[dict[str, Any]] = [{"name": "echo", "type": "echo"}]
    models: list[dict[str, Any]] = [{"name": "echo", "provider": "echo"}]
    if upstream_url:
        providers.append({"name": "up", "type": "openai", "base_url": upstream_url, "api_key": UPSTREAM_KEY})
        models += [
            {"name": "llama*", "provider": "up", "upstream_model": "llama3.2"},
            {"name": "gpt-*", "provider": "up"},
        ]
    return {"providers": providers, "models": models}


@pytest.fixture
async def openai_fake(aiohttp_server: Any) -> OpenAIFake:
    fake = OpenAIFake(key=UPSTREAM_KEY)
    server = await aiohttp_server(fake.app)
    fake.base_url = str(server.make_url("/v1"))  # type: ignore[attr-defined]
    return fake


@pytest.fixture
def make_proxy(aiohttp_server: Any, tmp_path: Path) -> ProxyFactory:
    counter = iter(range(1000))

    async def factory(config: dict[str, Any] | str, env: dict[str, str] | None = None, db: Path | None = None) -> Proxy:
        text = config if isinstance(config, str) else yaml.safe_dump(config)
        cfg = parse_config(text, env=env or {})
        db_path = db or tmp_path / f"log{next(counter)}.db"
        app = create_app(cfg, db_path=str(db_path))
        server = await aiohttp_server(app)  # TestServer cancels handlers on disconnect, like serve
        return Proxy(server, app, db_path)

    return factory


@pytest.fixture
async def proxy(make_proxy: ProxyFactory, openai_fake: OpenAIFake) -> Proxy:
    return await make_proxy(base_config(openai_fake.base_url))  # type: ignore[attr-defined]


def qwen_config(qwen_url: str, **sessions: Any) -> dict[str, Any]:
    """Routes `qwen*` to a threaded qwen provider at `qwen_url`, plus echo."""
    cfg = base_config()
    cfg["providers"].append({"name": "qwen", "type": "qwen", "base_url": qwen_url, "token": QWEN_TOKEN})
    cfg["models"].append({"name": "qwen*", "provider": "qwen"})
    if sessions:
        cfg["sessions"] = sessions
    return cfg


@pytest.fixture
async def qwen_fake(aiohttp_server: Any) -> QwenFake:
    fake = QwenFake(token=QWEN_TOKEN)
    server = await aiohttp_server(fake.app)
    fake.base_url = str(server.make_url("")).rstrip("/")  # type: ignore[attr-defined]
    return fake


@pytest.fixture
async def qproxy(make_proxy: ProxyFactory, qwen_fake: QwenFake) -> Proxy:
    return await make_proxy(qwen_config(qwen_fake.base_url))  # type: ignore[attr-defined]
