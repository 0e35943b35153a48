"""CPU per upstream call: a bare aiohttp ClientSession against the proxy's upstream client
(provider_router/providers/http.py: the same session plus its slots, timeouts, caps and
decoding), both against bench/fake_openai.py on loopback, at 32 calls in flight,
repetitions interleaved. What the proxy's own upstream handling costs per call.

Run: .venv/bin/python bench/upstream_client.py [--calls N] [--reps R]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.passthrough import install_fast_loop  # noqa: E402
from bench.run import free_port  # noqa: E402
from provider_router.config import ProviderConfig  # noqa: E402
from provider_router.providers.http import Upstream, new_session, request_headers  # noqa: E402

BODY = b'{"model": "bench-model", "messages": [{"role": "user", "content": "Say hello in five words."}]}'
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer bench-key"}
IN_FLIGHT = 32


async def _calls(n: int, call: object) -> None:
    todo = iter(range(n))

    async def worker() -> None:
        for _ in todo:
            await call()  # type: ignore[operator]

    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))


async def with_aiohttp(url: str, n: int) -> None:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as s:

        async def call() -> None:
            async with s.post(url, data=BODY, headers=HEADERS) as r:
                await r.read()

        await _calls(n, call)


async def with_proxy_client(url: str, n: int) -> None:
    session = new_session()
    up = Upstream(session, ProviderConfig(name="bench", type="openai", base_url=url))
    headers = request_headers(HEADERS)

    async def call() -> None:
        ex = await up.request("POST", url, headers, BODY)
        await up.read(ex)

    try:
        await _calls(n, call)
    finally:
        await session.close()


def cpu_us_per_call(run: object, url: str, n: int) -> float:
    t0 = time.process_time()
    asyncio.run(run(url, n))  # type: ignore[operator]
    return (time.process_time() - t0) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000, help="calls per repetition (default 20000)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per client (default 3)")
    args = parser.parse_args()
    loop_name = install_fast_loop()
    port = free_port()
    fake = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("fake_openai.py")), "--port", str(port)],
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        for _ in range(100):  # wait for the fake to listen
            try:
                asyncio.run(with_proxy_client(url, 1))
                break
            except Exception:
                time.sleep(0.05)
        results: dict[str, list[float]] = {"aiohttp ClientSession": [], "provider-router Upstream": []}
        for _ in range(args.reps):
            results["aiohttp ClientSession"].append(cpu_us_per_call(with_aiohttp, url, args.calls))
            results["provider-router Upstream"].append(cpu_us_per_call(with_proxy_client, url, args.calls))
    finally:
        fake.terminate()
        fake.wait()
    print(f"CPU per upstream call, {args.calls} calls x {args.reps} reps, {IN_FLIGHT} in flight, {loop_name}:")
    medians = {name: statistics.median(v) for name, v in results.items()}
    for name, value in medians.items():
        print(f"  {name:28} {value:7.1f} us (median; runs: {', '.join(f'{x:.1f}' for x in results[name])})")
    base = medians["aiohttp ClientSession"]
    print(f"  ratio: {medians['provider-router Upstream'] / base:.2f}x")


if __name__ == "__main__":
    main()
