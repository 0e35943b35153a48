"""Soak test: many requests of every kind through the real daemon, watching its memory,
file descriptors and log database.

Starts a fake OpenAI upstream (in this process) and `python -m provider_router serve` (a
subprocess, its own process group), sends a mix of plain, streamed, client-abandoned
streams and upstream errors at modest concurrency, samples the daemon's RSS
(/proc/PID/status) and open fds (/proc/PID/fd) along the way, then stops it with SIGTERM
and counts the rows it flushed: every request must have exactly one.

    .venv/bin/python bench/soak.py --requests 50000

Bounded in count (`--requests`) and time (`--max-seconds`); everything on 127.0.0.1.
Exit status 0 when rows == requests and every answer was what its kind should get.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

REPO = Path(__file__).resolve().parent.parent
UPSTREAM_KEY = "soak-upstream-key"
# The mix, by request index modulo 10.
KINDS = ("plain",) * 4 + ("stream",) * 3 + ("disconnect", "error500", "error400")
STREAM_CHUNKS = 8
SLOW_CHUNKS = 20  # the abandoned streams: paced, so the client leaves mid-stream
SLOW_PACE_S = 0.005


# -- the fake upstream -----------------------------------------------------------------------
def _chunk(i: int, text: str) -> bytes:
    delta: dict[str, Any] = {"content": text}
    if i == 0:
        delta["role"] = "assistant"
    obj = {"id": "chatcmpl-soak", "object": "chat.completion.chunk", "created": 1700000000, "model": "soak",
           "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


FINAL = b'data: {"id":"chatcmpl-soak","object":"chat.completion.chunk","created":1700000000,"model":"soak","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
PLAIN = json.dumps({
    "id": "chatcmpl-soak", "object": "chat.completion", "created": 1700000000, "model": "soak",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "soak reply"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
}).encode()


async def upstream_chat(request: web.Request) -> web.StreamResponse:
    """Answers by the kind named at the start of the last message."""
    if request.headers.get("Authorization") != f"Bearer {UPSTREAM_KEY}":
        return web.json_response({"error": {"message": "bad key", "type": "auth"}}, status=401)
    body = await request.json()
    kind = str(body["messages"][-1]["content"]).split(" ", 1)[0]
    if kind == "error500":
        return web.json_response({"error": {"message": "upstream overloaded", "type": "server_error"}}, status=500)
    if kind == "error400":
        return web.json_response({"error": {"message": "bad field", "type": "invalid_request_error"}}, status=400)
    if not body.get("stream"):
        return web.Response(body=PLAIN, content_type="application/json")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    slow = kind == "disconnect"
    for i in range(SLOW_CHUNKS if slow else STREAM_CHUNKS):
        await resp.write(_chunk(i, f"w{i} "))
        if slow:
            await asyncio.sleep(SLOW_PACE_S)
    await resp.write(FINAL)
    await resp.write_eof()
    return resp


async def start_upstream() -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream_chat)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port


# -- the daemon ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM in KiB, and open fds (sockets among them)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    fds = os.listdir(f"/proc/{pid}/fd")
    sockets = 0
    for fd in fds:
        with contextlib.suppress(OSError):
            sockets += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    out["fds"], out["sockets"] = len(fds), sockets
    return out


async def wait_listening(log: Path, proc: asyncio.subprocess.Process, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if b'"event":"listening"' in log.read_bytes():
            return
        if proc.returncode is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        await asyncio.sleep(0.05)
    raise RuntimeError("daemon did not report listening in time")


# -- the load ----------------------------------------------------------------------------------
@dataclass
class Tally:
    sent: int = 0
    done: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    samples: dict[str, dict[str, int]] = field(default_factory=dict)


async def one(s: aiohttp.ClientSession, url: str, i: int, tally: Tally) -> None:
    kind = KINDS[i % len(KINDS)]
    body = {"model": "soak-model", "messages": [{"role": "user", "content": f"{kind} request {i}"}],
            "stream": kind in ("stream", "disconnect")}
    tally.sent += 1
    tally.by_kind[kind] += 1
    try:
        async with s.post(url, json=body) as r:
            if kind == "disconnect":
                first = await r.content.readuntil(b"\n\n")
                r.close()  # leave mid-stream: the connection is closed, not reused
                ok = r.status == 200 and first.startswith(b"data: ")
            else:
                data = await r.read()
                expected = {"plain": 200, "stream": 200, "error500": 500, "error400": 400}[kind]
                ok = r.status == expected and (kind != "stream" or data.rstrip().endswith(b"data: [DONE]"))
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        ok = False
        kind = f"{kind}:{type(e).__name__}"
    if not ok:
        tally.unexpected[kind] += 1


async def load(url: str, n: int, concurrency: int, pid: int, tally: Tally) -> None:
    marks = {max(1, n * k // 10): f"{10 * k}%" for k in range(1, 11)}  # the summary shows 10/50/100
    counter = iter(range(n))
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as s:

        async def worker() -> None:
            for i in counter:
                await one(s, url, i, tally)
                tally.done += 1
                if tally.done in marks:
                    tally.samples[marks[tally.done]] = proc_status(pid)
                    print(f"  {marks[tally.done]:>4} {tally.done} requests: {fmt(tally.samples[marks[tally.done]])}", flush=True)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def fmt(st: dict[str, int]) -> str:
    return f"RSS {st['VmRSS'] / 1024:.1f} MiB, fds {st['fds']} ({st['sockets']} sockets)"


# -- main ----------------------------------------------------------------------------------------
async def soak(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    runner, up_port = await start_upstream()
    port = free_port()
    cfg = tmp / "config.yaml"
    cfg.write_text(
        "providers:\n"
        f"  - {{name: up, type: openai, base_url: 'http://127.0.0.1:{up_port}/v1', api_key: {UPSTREAM_KEY}}}\n"
        "models:\n  - {name: 'soak-*', provider: up}\n"
    )
    db, log = tmp / "soak.db", tmp / "daemon.log"
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "provider_router", "serve", "--config", str(cfg), "--port", str(port), "--db", str(db),
            stdout=asyncio.subprocess.DEVNULL, stderr=out, cwd=tmp, env=env, start_new_session=True,
        )
    tally = Tally()
    code = 1
    try:
        await wait_listening(log, proc)
        start = proc_status(proc.pid)
        print(f"daemon pid {proc.pid} on 127.0.0.1:{port}; db {db}")
        print(f"  start: {fmt(start)}", flush=True)
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(args.max_seconds):
                await load(f"http://127.0.0.1:{port}/v1/chat/completions", args.requests, args.concurrency, proc.pid, tally)
        except TimeoutError:
            print(f"stopped by --max-seconds after {tally.done} requests", flush=True)
        elapsed = time.monotonic() - t0
        end_open = proc_status(proc.pid)
        await asyncio.sleep(1.0)  # client connections closed: let the daemon notice
        end = proc_status(proc.pid)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(120):
            rc = await proc.wait()
        conn = sqlite3.connect(db)
        rows = conn.execute("SELECT count(*) FROM requests").fetchone()[0]
        outcomes = dict(conn.execute("SELECT outcome || ' ' || status, count(*) FROM requests GROUP BY 1 ORDER BY 2 DESC").fetchall())
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        conn.close()
        lines = log.read_bytes().splitlines()
        warnings = Counter(json.loads(x).get("event") for x in lines if b'"level":"warning"' in x or b'"level":"error"' in x)

        print()
        print(f"requests sent         {tally.sent} in {elapsed:.1f} s ({tally.sent / elapsed:.0f}/s), concurrency {args.concurrency}")
        print(f"  by kind             {dict(tally.by_kind)}")
        print(f"  unexpected answers  {dict(tally.unexpected) or 0}")
        print(f"rows in the DB        {rows} (daemon exit code {rc}; integrity_check {integrity})")
        print(f"  by outcome, status  {outcomes}")
        for mark in ("10%", "50%", "100%"):
            if mark in tally.samples:
                print(f"RSS at {mark:<5}         {tally.samples[mark]['VmRSS'] / 1024:.1f} MiB")
        print(f"RSS peak (VmHWM)      {end['VmHWM'] / 1024:.1f} MiB")
        print(f"fds start / end       {start['fds']} / {end['fds']} (sockets {start['sockets']} / {end['sockets']}; "
              f"{end_open['fds']} fds before the client closed its {args.concurrency} connections)")
        print(f"log warnings/errors   {dict(warnings) or 0}")
        ok = rows == tally.sent and not tally.unexpected and rc == 0 and integrity == "ok"
        print("RESULT", "ok" if ok else "FAILED")
        code = 0 if ok else 1
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        await runner.cleanup()
        if args.keep_tmp:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="stop sending after this long")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the config, database and daemon log")
    args = parser.parse_args()
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be >= 1")
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
