"""Property: for random conversation traces (continue, regenerate, edit, go back, new
conversation, proxy restart), the context the threaded upstream saw at every turn equals
the history the client sent. Texts come from tiny pools so conversations collide often.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

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
)


class Harness:
    def __init__(self, fake: QwenFake, cfg_text: str, db: Path) -> None:
        self.fake, self.cfg_text, self.db = fake, cfg_text, db
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

    async def ask(self, history: list[Msg], stream: bool) -> str:
        assert self.sdk is not None
        turns_before = len(self.fake.turns)
        if stream:
            s = await self.sdk.chat.completions.create(model="qwen3-max", messages=history, stream=True)
            reply = "".join([c.choices[0].delta.content or "" async for c in s if c.choices])
        else:
            r = await self.sdk.chat.completions.create(model="qwen3-max", messages=history)
            reply = r.choices[0].message.content or ""
        assert len(self.fake.turns) == turns_before + 1
        t = self.fake.turns[-1]
        assert t.completed and reply == t.reply
        assert context_matches(t.context, history), (t.context, history)
        return reply


async def run_trace(ops: list[tuple[Any, ...]], streams: list[bool]) -> None:
    fake = QwenFake(token="qwen-token-test", seed=len(ops))
    upstream = TestServer(fake.app)
    await upstream.start_server()
    cfg = yaml.safe_dump(qwen_config(str(upstream.make_url("")).rstrip("/")))
    with tempfile.TemporaryDirectory() as tmp:
        h = Harness(fake, cfg, Path(tmp) / "p.db")
        await h.start()
        convs: list[list[Msg]] = []
        try:
            for i, o in enumerate(ops):
                stream = streams[i % len(streams)]
                kind = o[0]
                if kind == "restart":
                    await h.stop()
                    await h.start()
                    continue
                if kind == "new" or not convs:
                    system, text = (o[1], o[2]) if kind == "new" else (None, "hi")
                    history = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
                    convs.append(history)
                    idx = len(convs) - 1
                else:
                    idx = o[1] % len(convs)
                    conv = convs[idx]
                    assistants = [j for j, m in enumerate(conv) if m["role"] == "assistant"]
                    if kind == "continue":
                        history = conv + [{"role": "user", "content": o[2]}]
                    elif kind in ("regenerate", "edit"):
                        history = conv[:-1]  # drop the last reply
                        if kind == "edit":
                            history = history[:-1] + [{"role": "user", "content": o[2]}]
                    else:  # back to just after an earlier reply (or to the start)
                        cut = assistants[o[2] % len(assistants)] + 1 if assistants else 0
                        history = conv[:cut] + [{"role": "user", "content": o[3]}]
                    if not any(m["role"] == "user" for m in history):
                        history = history + [{"role": "user", "content": "hi"}]
                reply = await h.ask(history, stream)
                convs[idx] = history + [{"role": "assistant", "content": reply}]
        finally:
            await h.stop()
            await upstream.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, min_size=1, max_size=14), st.lists(st.booleans(), min_size=1, max_size=4))
def test_random_traces_keep_the_upstream_context_equal_to_the_history(ops: list[tuple[Any, ...]], streams: list[bool]) -> None:
    """At every turn of any trace, the upstream's context is exactly the client's history."""
    asyncio.run(run_trace(ops, streams))
