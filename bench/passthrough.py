"""The benchmark's floor: the least an aiohttp proxy can do. It reads the body, POSTs it
upstream on one shared ClientSession and streams the reply back chunk by chunk with the
same status and content type; no logging, no parsing. Run: ``python bench/passthrough.py
--port 9002 --upstream http://127.0.0.1:9001``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

SESSION: web.AppKey[ClientSession] = web.AppKey("session", ClientSession)
UPSTREAM: web.AppKey[str] = web.AppKey("upstream", str)
FORWARDED_HEADERS = ("Content-Type", "Authorization")


async def forward(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = {h: request.headers[h] for h in FORWARDED_HEADERS if h in request.headers}
    url = request.app[UPSTREAM] + request.rel_url.path_qs
    session = request.app[SESSION]
    async with session.request(request.method, url, data=body, headers=headers) as upstream:
        response = web.StreamResponse(status=upstream.status)
        if upstream.content_type:
            response.content_type = upstream.content_type
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        except ConnectionResetError:  # the client went away (e.g. wrk stopping mid-request)
            pass
        return response


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    connector = TCPConnector(limit=0, keepalive_timeout=60)
    timeout = ClientTimeout(total=None, sock_connect=10, sock_read=120)
    async with ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        app[SESSION] = session
        yield


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(_session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def install_fast_loop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:9001")
    parser.add_argument("--loop", choices=("auto", "asyncio"), default="auto",
                        help="auto uses uvloop when installed")
    args = parser.parse_args(argv)
    loop_name = install_fast_loop() if args.loop == "auto" else "asyncio"
    print(f"passthrough on {args.host}:{args.port} -> {args.upstream} ({loop_name})",
          file=sys.stderr, flush=True)
    web.run_app(make_app(args.upstream), host=args.host, port=args.port,
                access_log=None, print=None, handle_signals=True)


if __name__ == "__main__":
    main()
