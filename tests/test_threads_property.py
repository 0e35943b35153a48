"""Property: for random conversation traces (continue, regenerate, edit, go back, new
conversation, proxy restart, two turns at once, a chat the upstream forgets), on an upstream
that stays busy until each reply stream has closed, the context the threaded upstream saw at
every turn equals the history the client sent; no turn was refused as overlapping another;
and the upstream holds one chat per distinct opening, plus one per chat it forgot. Texts
come from tiny pools so conversations collide often.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any, Callable, Protocol

import openai
import yaml
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from provider_router import create_app, parse_config
from tests.conftest import qwen_config
from tests.fakes.qwen import QwenFake
from tests.test_threads import context_matches

Msg = dict[str, Any]
TEXTS = ["hi", "hello", "why?", "ok"]
SYSTEMS = [None, "be brief"]

op = st.one_of(
    st.tuples(st.just("new"), st.sampled_from(SYSTEMS), st.sampled_from(TEXTS)),
    st.tuples(st.just("continue"), st.integers(0, 7), st.sampled_from(TEXTS)),
    st.tuples(st.just("regenerate"), st.integers(0, 7)),
    st.tuples(st.just("edit"), st.integers(0, 7), st.sampled_from(TEXTS)),
    st.tuples(st.just("back"), st.integers(0, 7), st.integers(0, 9), st.sampled_from(TEXTS)),
    st.tuples(st.just("restart")),
    st.tuples(st.just("together"), st.integers(0, 7), st.sampled_from(TEXTS), st.sampled_from(TEXTS)),
    st.tuples(st.just("new_twice"), st.sampled_from(SYSTEMS), st.sampled_from(TEXTS)),
    st.tuples(st.just("regenerate_first"), st.integers(0, 7)),
    st.tuples(st.just("forget"), st.integers(0, 7)),
)
LINGER = 0.005  # seconds each upstream stream stays open after `finished`, the chat busy


def opening(history: list[Msg]) -> tuple[tuple[str, str], ...]:
    """What a session is found by besides the client and the route: up to the first user message."""
    out = []
    for m in history:
        out.append((m["role"], m["content"]))
        if m["role"] == "user":
            break
    return tuple(out)


class Proxies(Protocol):
    """What a trace runs against: one proxy, or several instances on one database."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def restart(self) -> None: ...
    async def ask_at_once(self, histories: list[list[Msg]], streams: list[bool]) -> list[str]: ...


def check_replies(fake: QwenFake, turns_before: int, histories: list[list[Msg]], replies: list[str]) -> None:
    """Each reply is the upstream's to exactly its history, one upstream turn each."""
    new = fake.turns[turns_before:]
    assert len(new) == len(histories)
    for history, reply in zip(histories, replies):
        assert any(t.completed and t.reply == reply and context_matches(t.context, history) for t in new), (history, reply)


class Harness:
    """The proxy in this process, restarted on the same database."""

    def __init__(self, fake: QwenFake, cfg_text: str, db: Path) -> None:
        self.fake, self.cfg_text, self.db = fake, cfg_text, db / "p.db"
        self.server: TestServer | None = None
        self.sdk: openai.AsyncOpenAI | None = None

    async def start(self) -> None:
        app = create_app(parse_config(self.cfg_text, env={}), db_path=str(self.db))
        self.server = TestServer(app)
        await self.server.start_server()
        self.sdk = openai.AsyncOpenAI(base_url=str(self.server.make_url("/v1")), api_key="x", max_retries=0)

    async def stop(self) -> None:
        assert self.server is not None and self.sdk is not None
        await self.sdk.close()
        await self.server.close()

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def ask_at_once(self, histories: list[list[Msg]], streams: list[bool]) -> list[str]:
        """The histories sent at the same time; each reply is the upstream's to exactly its history."""
        turns_before = len(self.fake.turns)
        replies = await asyncio.gather(*(self._one(h, s) for h, s in zip(histories, streams)))
        check_replies(self.fake, turns_before, histories, replies)
        return replies

    async def _one(self, history: list[Msg], stream: bool) -> str:
        assert self.sdk is not None
        if stream:
            s = await self.sdk.chat.completions.create(model="qwen3-max", messages=history, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in s if c.choices])
        r = await self.sdk.chat.completions.create(model="qwen3-max", messages=history)
        return r.choices[0].message.content or ""


Proxied = Callable[[QwenFake, str, Path], Proxies]


async def run_trace(ops: list[tuple[Any, ...]], streams: list[bool], proxies: Proxied = Harness) -> None:
    fake = QwenFake(token="qwen-token-test", seed=len(ops), linger=LINGER)
    upstream = TestServer(fake.app)
    await upstream.start_server()
    cfg = yaml.safe_dump(qwen_config(str(upstream.make_url("")).rstrip("/")))
    with tempfile.TemporaryDirectory() as tmp:
        h = proxies(fake, cfg, Path(tmp))
        await h.start()
        convs: list[list[Msg]] = []
        chats: list[str] = []  # each conversation's upstream chat, as of its last reply
        openings: set[tuple[tuple[str, str], ...]] = set()
        try:
            for i, o in enumerate(ops):
                stream = streams[i % len(streams)]
                kind = o[0]
                if kind == "restart":
                    await h.restart()
                    continue
                if kind == "forget":
                    if convs and chats[o[1] % len(convs)] in fake.chats:
                        fake.forget(chats[o[1] % len(convs)])
                    continue
                if kind in ("new", "new_twice") or not convs:
                    system, text = (o[1], o[2]) if kind in ("new", "new_twice") else (None, "hi")
                    history = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
                    convs.append(history)
                    chats.append("")
                    idx = len(convs) - 1
                else:
                    idx = o[1] % len(convs)
                    conv = convs[idx]
                    assistants = [j for j, m in enumerate(conv) if m["role"] == "assistant"]
                    if kind in ("continue", "together"):
                        history = conv + [{"role": "user", "content": o[2]}]
                    elif kind in ("regenerate", "edit"):
                        history = conv[:-1]  # drop the last reply
                        if kind == "edit":
                            history = history[:-1] + [{"role": "user", "content": o[2]}]
                    elif kind == "regenerate_first":
                        history = conv[: assistants[0]] if assistants else conv
                    else:  # back to just after an earlier reply (or to the start)
                        cut = assistants[o[2] % len(assistants)] + 1 if assistants else 0
                        history = conv[:cut] + [{"role": "user", "content": o[3]}]
                    if not any(m["role"] == "user" for m in history):
                        history = history + [{"role": "user", "content": "hi"}]
                batch = [history]
                if kind == "together":
                    batch.append(convs[idx] + [{"role": "user", "content": o[3]}])
                elif kind == "new_twice":
                    batch.append(history)
                replies = await h.ask_at_once(batch, [stream, not stream][: len(batch)])
                for j, (sent, reply) in enumerate(zip(batch, replies)):
                    openings.add(opening(sent))
                    at = idx if j == 0 else len(convs)
                    if j > 0:  # the second of two at once goes on as a conversation of its own
                        convs.append([])
                        chats.append("")
                    convs[at] = sent + [{"role": "assistant", "content": reply}]
                    chats[at] = next(t.chat_id for t in reversed(fake.turns) if t.reply == reply)
            assert fake.refused_busy == 0
            assert fake.created_chats == len(openings) + len(set(fake.not_found))
        finally:
            await h.stop()
            await upstream.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, min_size=1, max_size=14), st.lists(st.booleans(), min_size=1, max_size=4))
def test_random_traces_keep_the_upstream_context_equal_to_the_history(ops: list[tuple[Any, ...]], streams: list[bool]) -> None:
    """At every turn of any trace, the upstream's context is exactly the client's history."""
    asyncio.run(run_trace(ops, streams))
