"""`GET /v1/models` lists ids a client can send: exact route names, and for a glob route the
matching ids its upstream reports (cached briefly, left out while it is down);
`GET /v1/models/{id}` agrees with the list."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import Proxy, ProxyFactory, base_config
from tests.fakes.openai import OpenAIFake


async def test_a_glob_route_lists_the_upstreams_matching_ids(proxy: Proxy, openai_fake: OpenAIFake) -> None:
    """`llama*` and `gpt-*` become the upstream's llama and gpt ids; an upstream id no route
    sends there (text-embedding-3-small) is not listed; a second listing is served from the cache."""
    ids = [m.id for m in (await proxy.sdk().models.list()).data]
    assert ids == ["echo", "llama3.2", "llama3.1:8b", "gpt-4o", "gpt-4o-mini"]
    assert [m.id for m in (await proxy.sdk().models.list()).data] == ids
    assert openai_fake.models_asked == 1


async def test_first_match_wins_in_the_listing_too(make_proxy: ProxyFactory, openai_fake: OpenAIFake) -> None:
    """An upstream id that an earlier route claims is listed once, owned by that route's provider."""
    cfg = base_config(openai_fake.base_url)  # type: ignore[attr-defined]
    cfg["models"].insert(0, {"name": "gpt-4o", "provider": "echo"})
    p = await make_proxy(cfg)
    owners = {m.id: m.owned_by for m in (await p.sdk().models.list()).data}
    assert owners == {"gpt-4o": "echo", "echo": "echo", "llama3.2": "up", "llama3.1:8b": "up", "gpt-4o-mini": "up"}


async def test_an_upstream_that_is_down_is_left_out(make_proxy: ProxyFactory, openai_fake: OpenAIFake, unused_tcp_port: int) -> None:
    """Glob routes of an upstream that errors, or does not listen, list nothing; exact names stay."""
    openai_fake.models_down = True
    p = await make_proxy(base_config(openai_fake.base_url))  # type: ignore[attr-defined]
    assert [m.id for m in (await p.sdk().models.list()).data] == ["echo"]
    cfg = base_config(f"http://127.0.0.1:{unused_tcp_port}/v1")
    cfg["models"].append({"name": "gpt-4o", "provider": "up"})
    p = await make_proxy(cfg)
    assert [m.id for m in (await p.sdk().models.list()).data] == ["echo", "gpt-4o"]


async def test_retrieving_one_model_agrees_with_the_list(proxy: Proxy) -> None:
    """`models.retrieve` finds every listed id (colons included) and only those."""
    for m in (await proxy.sdk().models.list()).data:
        got = await proxy.sdk().models.retrieve(m.id)
        assert (got.id, got.owned_by) == (m.id, m.owned_by)
    for missing in ("gpt-*", "text-embedding-3-small", "nope"):
        with pytest.raises(openai.NotFoundError) as e:
            await proxy.sdk().models.retrieve(missing)
        assert e.value.code == "model_not_found"
    rows = await proxy.rows("SELECT path, model, status FROM requests ORDER BY rowid")
    assert rows[-1] == {"path": "/v1/models/nope", "model": "nope", "status": 404}


async def test_an_unknown_model_is_told_the_names_apart_from_the_patterns(proxy: Proxy) -> None:
    """The 404 for a model no route takes names the exact models, and the glob routes as
    patterns to match (the listing has their ids), not as models to send."""
    with pytest.raises(openai.NotFoundError) as e:
        await proxy.sdk().chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"
    assert "Available models: echo; and names matching llama*, gpt-* (GET /v1/models lists them)" in e.value.message
