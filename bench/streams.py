"""Concurrent streams through the proxy, and its CPU per request. A fake upstream (in a
subprocess) holds each stream open `--hold` seconds after its first chunk, so `--streams`
of them are in flight at once; the same streams go direct to it, then through a proxy
daemon. Reported: time to first byte (median, p99) direct and through the proxy, what the
proxy adds, how many of its upstream calls waited for a connection (its /metrics), and the
daemon's CPU per plain (non-stream) request at 32 in flight.

`--src DIR` runs the daemon from another checkout of provider_router (e.g. one exported
with `git archive <commit> | tar -x -C DIR`), to compare before and after a change.
Run: .venv/bin/python bench/streams.py [--streams 1000] [--hold 5] [--src DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
BODY = {"model": "bench-model", "messages": [{"role": "user", "content": "Say hello."}]}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def upstream_app(hold: float) -> web.Application:
    """Chat completions: a stream sends its first chunk at once, the rest after `hold` s."""
    chunk = b'data: {"id":"c","object":"chat.completion.chunk","created":0,"model":"m","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
    whole = b'{"id":"c","object":"chat.completion","created":0,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}'

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.Response(body=whole, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk)
        await asyncio.sleep(hold)
        await resp.write(chunk + b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


def serve_upstream(port: int, hold: float) -> None:
    web.run_app(upstream_app(hold), host="127.0.0.1", port=port, print=None, access_log=None, backlog=4096)


async def ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(300):
            if proc.poll() is not None:
                raise SystemExit(f"{url}: process exited ({proc.returncode})")
            try:
                async with s.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise SystemExit(f"{url}: not ready")


async def ttfbs(url: str, n: int) -> list[float]:
    """`n` streams at once; the seconds each waited for its first chunk."""
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as s:

        async def one() -> float:
            t0 = time.perf_counter()
            async with s.post(f"{url}/v1/chat/completions", json={**BODY, "stream": True}) as r:
                assert r.status == 200, await r.text()
                await r.content.readany()
                t = time.perf_counter() - t0
                await r.read()
                return t

        return await asyncio.gather(*(one() for _ in range(n)))


async def plain(url: str, n: int, in_flight: int = 32) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        todo = iter(range(n))

        async def worker() -> None:
            for _ in todo:
                async with s.post(f"{url}/v1/chat/completions", json=BODY) as r:
                    assert r.status == 200
                    await r.read()

        await asyncio.gather(*(worker() for _ in range(in_flight)))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--hold", type=float, default=5.0)
    parser.add_argument("--plain", type=int, default=5000, help="plain requests for the CPU row")
    parser.add_argument("--src", default=str(ROOT), help="the provider_router checkout to run")
    parser.add_argument("--json", action="store_true", help="print one JSON object (for bench/run.py)")
    args = parser.parse_args()
    up_port, proxy_port = free_port(), free_port()
    up = subprocess.Popen([sys.executable, __file__, "--serve-upstream", str(up_port), str(args.hold)])
    tmp = Path(tempfile.mkdtemp(prefix="bench-streams-"))
    cfg = tmp / "config.yaml"
    cfg.write_text(
        f"providers:\n  - {{name: up, type: openai, base_url: 'http://127.0.0.1:{up_port}/v1'}}\n"
        "models:\n  - {name: 'bench-*', provider: up}\nauth: {metrics_public: true}\n"
    )
    env = {**os.environ, "PYTHONPATH": args.src}
    proxy = subprocess.Popen(
        [sys.executable, "-m", "provider_router", "serve", "--config", str(cfg), "--port", str(proxy_port), "--db", str(tmp / "log.db"),
         "--log-level", "warning"],
        cwd=args.src, env=env, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    direct, through = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{proxy_port}"
    try:
        await ready(f"{direct}/", up)
        await ready(f"{through}/health", proxy)
        await plain(through, 500)  # warm up
        c0 = cpu_seconds(proxy.pid)
        await plain(through, args.plain)
        cpu_us = (cpu_seconds(proxy.pid) - c0) / args.plain * 1e6
        d = await ttfbs(direct, args.streams)
        p = await ttfbs(through, args.streams)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{through}/metrics") as r:
                metrics = await r.text()
    finally:
        for proc in (proxy, up):
            proc.terminate()
            proc.wait()
    waited = re.search(r'^provider_router_upstream_queue_ms_sum\{provider="up"\} (\S+)$', metrics, re.M)
    fast = re.search(r'^provider_router_upstream_queue_ms_bucket\{le="1.0",provider="up"\} (\S+)$', metrics, re.M)
    count = re.search(r'^provider_router_upstream_queue_ms_count\{provider="up"\} (\S+)$', metrics, re.M)
    if args.json:
        calls = float(count.group(1)) if count else None
        print(json.dumps({
            "source": args.src, "streams": args.streams, "cpu_us_per_plain": cpu_us,
            "direct_median_ms": statistics.median(d) * 1000, "direct_p99_ms": pct(d, 0.99) * 1000,
            "proxy_median_ms": statistics.median(p) * 1000, "proxy_p99_ms": pct(p, 0.99) * 1000,
            "upstream_calls": calls,
            "waited_over_1ms": calls - float(fast.group(1)) if calls is not None and fast else None,
        }))  # fmt: skip
        return
    print(f"source: {args.src}")
    print(f"daemon CPU per plain request (32 in flight, {args.plain} requests): {cpu_us:.0f} us")
    for name, v in (("direct", d), ("proxy", p)):
        print(f"{args.streams} streams at once, {name:6}: TTFB median {statistics.median(v) * 1000:7.1f} ms, p99 {pct(v, 0.99) * 1000:7.1f} ms, max {max(v) * 1000:7.1f} ms")
    print(f"  added by the proxy: median {(statistics.median(p) - statistics.median(d)) * 1000:.1f} ms, p99 {(pct(p, 0.99) - pct(d, 0.99)) * 1000:.1f} ms")
    if count and fast and waited:
        slow = float(count.group(1)) - float(fast.group(1))
        print(f"  upstream calls that waited for a connection over 1 ms: {slow:.0f} of {float(count.group(1)):.0f} (total wait {float(waited.group(1)):.0f} ms)")
    else:
        print("  (this daemon reports no upstream queue metrics)")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-upstream":
        serve_upstream(int(sys.argv[2]), float(sys.argv[3]))
    else:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        asyncio.run(main())
