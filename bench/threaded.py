"""The threaded path: turn-by-turn conversations through the proxy (a real daemon process)
against a fake Qwen upstream, and how many bytes each turn sends upstream.

Run: .venv/bin/python bench/threaded.py [--conversations 8] [--turns 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
import yaml
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fakes.qwen import QwenFake  # noqa: E402

TOKEN = "bench-qwen-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("the proxy exited during start-up")
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError("the proxy did not become ready")


async def _conversation(s: aiohttp.ClientSession, url: str, i: int, turns: int) -> int:
    history: list[dict[str, str]] = [{"role": "system", "content": f"persona {i}"}]
    for t in range(turns):
        history.append({"role": "user", "content": f"conversation {i:03d} turn {t:03d}: tell me more"})
        async with s.post(url, json={"model": "qwen3-max", "messages": history}) as r:
            body = await r.json()
            if r.status != 200:
                raise RuntimeError(f"turn {t} of conversation {i}: HTTP {r.status} {body}")
        history.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
    return turns


async def measure(conversations: int = 8, turns: int = 50) -> dict[str, float]:
    fake = QwenFake(token=TOKEN, max_piece=4096)  # large pieces: measure the proxy, not the splitter
    runner = web.AppRunner(fake.app, access_log=None)
    await runner.setup()
    up_port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", up_port).start()
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {
            "providers": [{"name": "qwen", "type": "qwen", "base_url": f"http://127.0.0.1:{up_port}", "token": TOKEN}],
            "models": [{"name": "qwen*", "provider": "qwen"}],
        }
        (Path(tmp) / "config.yaml").write_text(yaml.safe_dump(cfg))
        proc = subprocess.Popen(
            [sys.executable, "-m", "provider_router", "serve", "--config", f"{tmp}/config.yaml", "--port", str(port), "--db", f"{tmp}/t.db"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            await _wait_ready(f"http://127.0.0.1:{port}/v1/models", proc)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            t0 = time.perf_counter()
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conversations)) as s:
                done = await asyncio.gather(*(_conversation(s, url, i, turns) for i in range(conversations)))
            elapsed = time.perf_counter() - t0
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
            await runner.cleanup()
    by_turn: dict[int, list[int]] = {}
    depth: dict[str, int] = {}
    for t in fake.turns:  # the n-th completed turn of each chat
        depth[t.chat_id] = depth.get(t.chat_id, 0) + 1
        by_turn.setdefault(depth[t.chat_id], []).append(t.request_bytes)
    return {
        "turns_per_s": sum(done) / elapsed,
        "bytes_turn_2": statistics.median(by_turn[2]),
        f"bytes_turn_{turns}": statistics.median(by_turn[turns]),
        "chats_created": fake.created_chats,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=50)
    args = ap.parse_args()
    print(orjson.dumps(asyncio.run(measure(args.conversations, args.turns)), option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
