"""`GET /v1/models` and `GET /v1/models/{id}`: the model ids a client can send.

A route with an exact name is listed as it is. A glob route (`llama*`) lists the ids its
`openai` upstream's own `/models` reports that match the glob and that routing would send
there (first match wins), fetched with a short timeout, cached briefly, and left out while
that upstream does not answer. Both endpoints read the same listing, so they agree.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import structlog
from aiohttp import web

from ..config import ModelConfig
from ..errors import ApiError
from ..providers import forwards
from ..routing import NoRoute, is_glob
from ..state import RECORD, STATE, State

log = structlog.get_logger("provider_router.api")
FRESH_SECONDS = 60.0  # an upstream's list is reused this long
RETRY_SECONDS = 10.0  # an upstream that did not answer is asked again after this
FETCH_TIMEOUT = 3.0  # a model list is small: an upstream slower than this is left out


class Catalog:
    """Each provider's upstream model ids, fetched on demand and cached; one fetch at a
    time per provider (concurrent listings wait for it)."""

    def __init__(self) -> None:
        self._ids: dict[str, tuple[float, list[str]]] = {}  # provider -> (fresh until, ids)
        self._fetching: dict[str, asyncio.Task[list[str]]] = {}

    async def ids(self, state: State, provider: str) -> list[str]:
        hit = self._ids.get(provider)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        task = self._fetching.get(provider)
        if task is None:
            task = self._fetching[provider] = asyncio.create_task(self._fetch(state, provider), name=f"models-{provider}")
            task.add_done_callback(lambda _: self._fetching.pop(provider, None))
        # Shielded: a client that leaves does not cancel the fetch others wait on.
        return await asyncio.shield(task)

    async def close(self) -> None:
        """Cancel fetches still running (the app is stopping; nobody waits for them)."""
        tasks = list(self._fetching.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _fetch(self, state: State, provider: str) -> list[str]:
        forwarder = state.providers.get(provider)
        ids: list[str] = []
        fresh = RETRY_SECONDS
        if forwards(forwarder):
            try:
                async with asyncio.timeout(FETCH_TIMEOUT):
                    reply = await forwarder.call("GET", "/models")
                    try:
                        data = await reply.read() if reply.read is not None else b""
                    finally:
                        reply.close()
                if reply.status == 200:
                    ids = _parse_ids(data)
                    fresh = FRESH_SECONDS
                else:
                    log.warning("upstream_models_failed", provider=provider, status=reply.status)
            except (ApiError, TimeoutError, ValueError) as e:
                log.warning("upstream_models_failed", provider=provider, error=getattr(e, "message", type(e).__name__))
        self._ids[provider] = (time.monotonic() + fresh, ids)
        return ids


def _parse_ids(data: bytes) -> list[str]:
    """The ids of an OpenAI model list (`{"data": [{"id": ...}, ...]}`); ValueError if it is not one."""
    obj = orjson.loads(data)
    items = obj.get("data") if isinstance(obj, dict) else None
    if not isinstance(items, list):
        raise ValueError("not an OpenAI model list")
    return [m["id"] for m in items if isinstance(m, dict) and isinstance(m.get("id"), str)]


CATALOG = web.AppKey("models_catalog", Catalog)


async def listing(request: web.Request) -> list[dict[str, Any]]:
    """The model objects `/v1/models` lists, in route order, each id once."""
    state = request.app[STATE]
    catalog = request.app[CATALOG]
    routes = state.router.available
    globs = {m.provider for m in routes if is_glob(m.name)}
    fetched = await asyncio.gather(*(catalog.ids(state, p) for p in globs))
    upstream_ids = dict(zip(globs, fetched))
    out: dict[str, dict[str, Any]] = {}
    for m in routes:
        if not is_glob(m.name):
            out.setdefault(m.name, _model(m.name, m.provider))
            continue
        for mid in upstream_ids[m.provider]:
            if mid not in out and _routes_here(state, mid, m):
                out[mid] = _model(mid, m.provider)
    return list(out.values())


def _routes_here(state: State, model_id: str, m: ModelConfig) -> bool:
    try:
        return state.router.route(model_id).model is m
    except NoRoute:
        return False


def _model(mid: str, owner: str) -> dict[str, Any]:
    return {"id": mid, "object": "model", "created": 0, "owned_by": owner}


async def list_models(request: web.Request) -> web.Response:
    data = await listing(request)
    return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")


async def get_model(request: web.Request) -> web.Response:
    model_id = request.match_info["model"]
    request[RECORD].model = model_id
    for m in await listing(request):
        if m["id"] == model_id:
            return web.Response(body=orjson.dumps(m), content_type="application/json")
    raise ApiError(404, f"The model `{model_id}` does not exist or is not routed.", param="model", code="model_not_found")
