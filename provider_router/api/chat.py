"""`POST /v1/chat/completions`: the body validated, then on each route in turn (attempts.py)
the threads place the history and the provider is called; a pass-through answer is relayed
(relay.py), a translated one rendered (render.py). On a threaded upstream the threads record
the reply once it completed, before the client gets its end, and hold its chat until the
upstream's body ended (the provider's events end there).
"""

from __future__ import annotations

from functools import partial

from aiohttp import web

from ..providers import ChatBusy, ChatCall, ChatGone, Provider, ThreadedProvider, is_threaded
from ..records import RequestRecord
from ..state import RECORD, STATE
from ..threads import Held, Placement, Threads
from . import attempts, intake
from .relay import relay_answer
from .render import BeforeEnd, render
from .validate import strip_steering, validate_chat

MAX_MESSAGES = 10_000


async def chat_completions(request: web.Request) -> web.StreamResponse:
    rec = request[RECORD]
    state = request.app[STATE]
    raw, body = await intake.read_body(request, state, rec)
    if isinstance(body.get("model"), str):
        rec.model = body["model"]  # logged even if the body is refused
    validate_chat(body, max_messages=MAX_MESSAGES)
    stream = bool(body.get("stream", False))
    rec.stream = stream
    routes = intake.routes(state, body["model"])
    stripped = strip_steering(raw, body)

    async def attempt(a: attempts.Attempt) -> web.StreamResponse:
        sent, data = intake.for_route(raw, body, stripped, a.route)
        call = ChatCall(body=sent, raw=data, stream=stream, upstream_model=a.route.upstream_model)
        provider = state.providers[a.route.provider.name]
        threads = state.threads
        if threads is None:
            return await _answer(request, rec, provider, call, a)
        if is_threaded(provider):
            return await _turn(request, rec, threads, provider, call, a)
        # A stateless upstream gets the whole history; the session is the log's business.
        await threads.sessions.join(request, rec, a.route, body["messages"])
        return await _answer(request, rec, provider, call, a)

    return await attempts.run(rec, routes, attempt)


async def _turn(
    request: web.Request, rec: RequestRecord, threads: Threads, provider: ThreadedProvider, call: ChatCall, a: attempts.Attempt
) -> web.StreamResponse:
    """A turn on a threaded upstream: sent where the threads placed it, and recorded by
    them once its reply completed. A chat the upstream lost is placed again (a chat made
    for this turn and lost at once is a 502)."""
    p = await threads.place(request, rec, a.route, call.body["messages"])
    new_chat = partial(provider.new_chat, call.upstream_model)
    while True:
        async with threads.hold(p, new_chat) as held:
            try:
                return await _send(request, rec, threads, provider, call, a, held)
            except ChatGone as e:
                p = threads.chat_gone(held.placement, str(e))


async def _send(
    request: web.Request, rec: RequestRecord, threads: Threads, provider: Provider, call: ChatCall, a: attempts.Attempt, held: Held
) -> web.StreamResponse:
    """The turn to its held chat; while the upstream says the chat is still busy, again."""
    p = held.placement
    _send_at(call, rec, p)
    while True:
        try:
            return await _answer(request, rec, provider, call, a, partial(threads.record, p, rec))
        except ChatBusy:
            await held.busy()


def _send_at(call: ChatCall, rec: RequestRecord, p: Placement) -> None:
    call.chat_id, call.parent_id, call.messages = p.chat_id, p.parent_id, p.messages
    rec.chat_id, rec.parent_id = p.chat_id, p.parent_id


async def _answer(
    request: web.Request, rec: RequestRecord, provider: Provider, call: ChatCall, a: attempts.Attempt,
    before_end: BeforeEnd | None = None,
) -> web.StreamResponse:  # fmt: skip
    reply = await provider.chat(call)
    a.queue_ms = reply.queue_ms
    try:
        if reply.raw is not None:
            rec.reply_format = "chat"  # the log writer reads the reply (a stream's events) from it
            return await relay_answer(request, rec, reply, call.stream, a.last)
        return await render(request, rec, reply, call, before_end)
    finally:
        reply.close()

