"""Threading without races on an upstream that, like the real one, counts a turn as running
until its reply stream has closed: a turn holds its chat that long, a chat the upstream still
calls busy is waited out, and a session keeps one upstream chat (a turn with nothing to
continue from is a branch at its root). Through the SDK, against the proxy and the strict fake.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import aiohttp
import openai
import pytest

from tests.conftest import QWEN_TOKEN, Proxy, ProxyFactory, qwen_config
from tests.fakes.qwen import QwenFake
from tests.test_fake_qwen import Events, body
from tests.test_threads import Conversation, last_turn_ok
from tests.waiting import until

LINGER = 0.2  # seconds the fake's stream stays open after `finished`


@pytest.fixture
async def lingering(aiohttp_server: Any) -> QwenFake:
    """A fake whose streams stay open a while after `finished`, the chat busy meanwhile."""
    fake = QwenFake(token=QWEN_TOKEN, linger=LINGER)
    server = await aiohttp_server(fake.app)
    fake.base_url = str(server.make_url("")).rstrip("/")  # type: ignore[attr-defined]
    return fake


@pytest.fixture
async def direct(qwen_fake: QwenFake) -> AsyncIterator[aiohttp.ClientSession]:
    """A client of the fake itself: turns the proxy did not send (another tab, another tool)."""
    async with aiohttp.ClientSession(
        base_url=qwen_fake.base_url,  # type: ignore[attr-defined]
        headers={"Authorization": f"Bearer {QWEN_TOKEN}", "Accept": "text/event-stream"},
    ) as s:
        yield s


async def _stalled_turn_elsewhere(fake: QwenFake, direct: aiohttp.ClientSession, parent: str) -> tuple[asyncio.Event, Events]:
    """A turn sent to the fake directly, under `parent`, that stays in progress until released."""
    release = fake.stall_next()
    chat_id = fake.turns[0].chat_id
    resp = await direct.post("/api/v2/chat/completions", params={"chat_id": chat_id}, json=body(chat_id, parent, "elsewhere"))
    stream = Events(resp)
    assert "response.created" in (await stream.next() or {})
    return release, stream


@pytest.mark.parametrize("stream", [False, True])
async def test_a_turn_holds_its_chat_until_the_upstream_stream_closed(make_proxy: ProxyFactory, lingering: QwenFake, stream: bool) -> None:
    """The next turn of a conversation reaches the upstream only once the previous turn's
    stream has closed there: the upstream never refuses one as "in progress"."""
    p = await make_proxy(qwen_config(lingering.base_url))  # type: ignore[attr-defined]
    conv = Conversation(p.sdk())
    for q in ("one", "two", "three"):
        await conv.say(q, stream=stream)
        last_turn_ok(lingering, conv.history[:-1])
    assert lingering.refused_busy == 0
    assert [t.parent_id for t in lingering.turns] == [None] + [t.response_id for t in lingering.turns[:-1]]


async def test_concurrent_turns_on_one_chat_never_overlap_upstream(make_proxy: ProxyFactory, lingering: QwenFake) -> None:
    """Three turns under one reply at once (regenerates, streamed or not) each wait for the
    stream before them to close upstream: all complete, none refused, each under that reply."""
    p = await make_proxy(qwen_config(lingering.base_url))  # type: ignore[attr-defined]
    conv = Conversation(p.sdk())
    await conv.say("one")
    nxt = conv.history + [{"role": "user", "content": "two"}]
    replies = await asyncio.gather(*(conv.ask(nxt, stream=i % 2 == 0) for i in range(3)))
    assert lingering.refused_busy == 0
    first = lingering.turns[0]
    assert all(t.completed and t.parent_id == first.response_id for t in lingering.turns[1:])
    assert sorted(replies) == sorted(t.reply for t in lingering.turns[1:])
    assert lingering.created_chats == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_a_chat_the_upstream_calls_busy_is_waited_out(
    qproxy: Proxy, qwen_fake: QwenFake, direct: aiohttp.ClientSession, stream: bool
) -> None:
    """"The chat is in progress!" is transient: the turn is sent again once the upstream's
    own turn ended, and the client gets its reply, not an error."""
    conv = Conversation(qproxy.sdk())
    await conv.say("one")
    release, elsewhere = await _stalled_turn_elsewhere(qwen_fake, direct, qwen_fake.turns[0].response_id)
    pending = asyncio.create_task(conv.say("two", stream=stream))
    await until(lambda: qwen_fake.refused_busy >= 1, "the upstream to refuse a busy chat")
    release.set()
    await elsewhere.rest()
    reply = await pending
    assert reply == qwen_fake.turns[-1].reply
    last_turn_ok(qwen_fake, conv.history[:-1])
    assert qwen_fake.turns[-1].parent_id == qwen_fake.turns[0].response_id


async def test_a_chat_busy_past_lock_wait_is_a_429(make_proxy: ProxyFactory, qwen_fake: QwenFake, direct: aiohttp.ClientSession) -> None:
    """A chat the upstream calls busy for longer than `lock_wait_seconds` answers 429
    `conversation_busy`, after trying again meanwhile; the conversation then carries on."""
    p = await make_proxy(qwen_config(qwen_fake.base_url, lock_wait_seconds=0.3))  # type: ignore[attr-defined]
    conv = Conversation(p.sdk())
    await conv.say("one")
    release, elsewhere = await _stalled_turn_elsewhere(qwen_fake, direct, qwen_fake.turns[0].response_id)
    nxt = conv.history + [{"role": "user", "content": "two"}]
    with pytest.raises(openai.RateLimitError) as e:
        await conv.ask(nxt)
    assert e.value.code == "conversation_busy"
    assert qwen_fake.refused_busy > 1
    release.set()
    await elsewhere.rest()
    await conv.ask(nxt)
    last_turn_ok(qwen_fake, nxt)


async def test_regenerating_the_first_reply_branches_at_the_root(qproxy: Proxy, qwen_fake: QwenFake) -> None:
    """The first reply regenerated is a second root of the same upstream chat, whose
    context is the opening alone; the conversation continues from either reply."""
    conv = Conversation(qproxy.sdk(), system="be brief")
    await conv.say("one")
    opening = conv.history[:-1]
    again = await conv.ask(opening, stream=True)
    t = qwen_fake.turns[-1]
    assert again == t.reply and t.parent_id is None and t.chat_id == qwen_fake.turns[0].chat_id
    last_turn_ok(qwen_fake, opening)
    onward = opening + [{"role": "assistant", "content": again}, {"role": "user", "content": "two"}]
    await conv.ask(onward)
    assert qwen_fake.turns[-1].parent_id == t.response_id
    last_turn_ok(qwen_fake, onward)
    assert qwen_fake.created_chats == 1


async def test_two_conversations_with_one_opening_share_one_chat(qproxy: Proxy, qwen_fake: QwenFake) -> None:
    """A second conversation opening as the first did is a branch at the root of the first's
    chat, and each keeps its own context after that."""
    a, b = Conversation(qproxy.sdk()), Conversation(qproxy.sdk())
    await a.say("hi")
    await b.say("hi", stream=True)
    await a.say("cats?")
    last_turn_ok(qwen_fake, a.history[:-1])
    await b.say("dogs?")
    last_turn_ok(qwen_fake, b.history[:-1])
    assert qwen_fake.created_chats == 1
    assert [t.parent_id for t in qwen_fake.turns[:2]] == [None, None]


def _joined(p: Proxy) -> int:
    """Requests the proxy's one session has counted (joined before they wait for a chat)."""
    sessions = p.state.sessions
    assert sessions is not None
    return sum(s.request_count for s in sessions.active.values())


async def _first_turns_at_once(p: Proxy, fake: QwenFake, release: asyncio.Event, n: int = 3) -> list[Conversation]:
    """`n` conversations send the same opening at once, and `release` is set once the proxy
    holds them all; their replies must all be the one a root turn gets."""
    convs = [Conversation(p.sdk()) for _ in range(n)]
    opening = [{"role": "user", "content": "hello"}]
    tasks = [asyncio.create_task(c.ask(opening, stream=i % 2 == 0)) for i, c in enumerate(convs)]
    await until(lambda: _joined(p) == n, f"{n} requests joined")
    release.set()
    replies = await asyncio.gather(*tasks)
    assert fake.created_chats == 1 and fake.refused_busy == 0
    assert len(fake.turns) == n and all(t.parent_id is None and t.completed for t in fake.turns)
    assert replies == [fake.turns[0].reply] * n  # one context each: the opening alone
    assert len({c.session_id for c in convs}) == 1
    return convs


async def test_concurrent_first_turns_of_a_session_share_one_chat(qproxy: Proxy, qwen_fake: QwenFake) -> None:
    """First turns arriving while their session's chat is being made wait for that chat and
    branch at its root instead of each making a chat."""
    await _first_turns_at_once(qproxy, qwen_fake, qwen_fake.stall_new_chat_next())


async def test_first_turns_while_the_chat_has_no_reply_yet_branch_at_its_root(qproxy: Proxy, qwen_fake: QwenFake) -> None:
    """First turns arriving while the session's chat holds only an unfinished first turn
    queue for the chat and become branches at its root."""
    await _first_turns_at_once(qproxy, qwen_fake, qwen_fake.stall_next())


async def test_a_root_branch_in_a_forgotten_chat_starts_a_new_one(qproxy: Proxy, qwen_fake: QwenFake) -> None:
    """When the session's chat is gone upstream, a turn with nothing to continue from
    starts one new chat, which the conversation then keeps."""
    conv = Conversation(qproxy.sdk())
    await conv.say("one")
    qwen_fake.forget(qwen_fake.turns[0].chat_id)
    opening = conv.history[:-1]
    reply = await conv.ask(opening)
    assert reply == qwen_fake.turns[-1].reply
    last_turn_ok(qwen_fake, opening)
    other = Conversation(qproxy.sdk())
    await other.say("one")
    assert qwen_fake.created_chats == 2
    assert qwen_fake.turns[-1].chat_id == qwen_fake.turns[-2].chat_id != qwen_fake.turns[0].chat_id
