"""The OpenAI endpoints besides chat that a `type: openai` upstream serves: `POST
/v1/responses`, `/v1/embeddings`, `/v1/completions`, routed by the body's `model` like chat
(fallbacks, retries) and relayed as the upstream answers, streams included, one log row each.

A model whose provider translates (echo, qwen) serves chat only: such a request is a 400
that says which endpoints it does serve. (A stateful `/v1/responses` kept in the
conversation store for every upstream would start here.)
"""

from __future__ import annotations

import re
from typing import Any, Awaitable, Callable

import orjson
from aiohttp import web

from ..errors import ApiError
from ..providers import forwards
from ..replies import completion_like
from ..state import RECORD, STATE
from . import attempts, intake
from .relay import relay_answer
from .validate import bad, strip_steering

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# What the proxy serves, for the 404 of any other path and the 400 of a chat-only model.
SUPPORTED = (
    "POST /v1/chat/completions",
    "POST /v1/responses",
    "POST /v1/embeddings",
    "POST /v1/completions",
    "GET /v1/models",
    "GET /v1/models/{model}",
    "GET /v1/sessions/{id}",
    "POST /v1/sessions/{id}/refresh",
    "DELETE /v1/sessions/{id}",
)
CHAT_ONLY = "POST /v1/chat/completions, GET /v1/models"
# (method, path pattern) of each: a path served under another method answers 405, not 404.
# A model id may hold slashes (`org/model`); a session id does not.
_ROUTES = tuple(
    (m, re.compile(re.escape(p).replace(r"\{model\}", ".+").replace(r"\{id\}", "[^/]+")))
    for m, p in (s.split(" ", 1) for s in SUPPORTED)
)


def endpoint(
    path: str, *, streams: bool, summarise: Callable[[bytes], bytes] | None = None, reply_format: str | None = None
) -> Handler:
    """The handler of `POST /v1{path}`; `streams`: the body's `stream` may ask for SSE;
    `summarise`: what of a successful answer the log keeps, if not all of it;
    `reply_format`: how the log writer reads the answer (text, tool calls, usage), if it can."""

    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE]
        rec = request[RECORD]
        rec.reply_format = reply_format  # None: the log writer keeps the body as it is
        raw, body = await intake.read_body(request, state, rec)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise bad("`model` is required: a non-empty string.", param="model")
        rec.model = model
        stream = streams and bool(body.get("stream", False))
        rec.stream = stream
        routes = intake.routes(state, model)
        served = [r for r in routes if forwards(state.providers[r.provider.name])]
        if not served:
            p = routes[0].provider
            rec.provider = p.name  # the row says whose endpoints these are
            raise ApiError(
                400, f"The model `{model}` is served by provider `{p.name}` (type {p.type}), which does not serve "
                f"POST /v1{path}; it serves {CHAT_ONLY}.", param="model", code="unsupported_endpoint",
            )  # fmt: skip
        stripped = strip_steering(raw, body)

        async def attempt(a: attempts.Attempt) -> web.StreamResponse:
            _, data = intake.for_route(raw, body, stripped, a.route)
            provider = state.providers[a.route.provider.name]
            assert forwards(provider)  # `served` holds only such routes
            reply = await provider.call("POST", path, data, stream)
            a.queue_ms = reply.queue_ms
            try:
                return await relay_answer(request, rec, reply, stream, a.last, summarise)
            finally:
                reply.close()

        return await attempts.run(rec, served, attempt)

    return handle


def embeddings_summary(data: bytes) -> bytes:
    """An embeddings answer as the log keeps it: model, usage and how many vectors, not the
    vectors (they are most of its size and no use in a log)."""
    obj = completion_like(data)
    if obj is None or not isinstance(obj.get("data"), list):
        return data
    summary: dict[str, Any] = {k: v for k, v in obj.items() if k != "data"}
    summary["data_count"] = len(obj["data"])
    return orjson.dumps(summary)


async def not_found(request: web.Request) -> web.Response:
    allowed = sorted({m for m, path in _ROUTES if path.fullmatch(request.path)})
    if allowed:
        raise ApiError(405, f"{request.path} takes {' or '.join(allowed)}, not {request.method}.", code="method_not_allowed")
    raise ApiError(
        404, f"Unknown endpoint {request.method} {request.path}. Supported: {', '.join(SUPPORTED)}.", code="unknown_url"
    )


def setup(app: web.Application) -> None:
    """Route the endpoints of this module (chat and models are routed by `app.py`)."""
    app.router.add_post("/v1/responses", endpoint("/responses", streams=True, reply_format="responses"))
    app.router.add_post("/v1/embeddings", endpoint("/embeddings", streams=False, summarise=embeddings_summary, reply_format="embeddings"))
    app.router.add_post("/v1/completions", endpoint("/completions", streams=True, reply_format="text_completion"))
