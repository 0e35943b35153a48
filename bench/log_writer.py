"""The log writer alone: how many request records per second it commits to SQLite, and
whether any are lost; and, separately, what assembling one forwarded 64-chunk stream costs.

Records are shaped as the daemon hands them over with sessions on: raw reply bytes (one
in four a 64-chunk stream) for the writer process to assemble, a stateless turn for it to
thread in the log, in 100 conversations, and the canonical log line for it to render.
The same count of non-stream records alone is measured too, to show what the streams cost.

Run: .venv/bin/python bench/log_writer.py [--records N] [--history-kb K]

`--history-kb` gives every request an agent-sized history of about K KB (system prompt,
alternating user and assistant messages, tool definitions) instead of two short
messages: what the writer costs when clients resend long conversations.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from provider_router.replies import assemble_stream, stream_events  # noqa: E402
from provider_router.sse import SSEParser  # noqa: E402
from provider_router.store import LogWriter, RequestRecord, connect  # noqa: E402
from provider_router.store.sessions import Session, SessionRepo  # noqa: E402

SESSIONS = 100

BODY = orjson.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Say hello in five words."}]}
)
REPLY = orjson.dumps(
    {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there, how are you?"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 7, "total_tokens": 27},
    }
)
CHUNKS = [
    b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"word%d "},"finish_reason":null}]}\n\n' % i
    for i in range(64)
] + [b"data: [DONE]\n\n"]
STREAM = b"".join(CHUNKS)


def agent_body(kb: int) -> bytes:
    """A chat request body of about `kb` KB, shaped like a coding agent's."""
    messages = [{"role": "system", "content": "You are a coding agent. " * 40}]
    turn = 0
    while len(orjson.dumps(messages)) < kb * 1024:
        messages.append({"role": "user", "content": f"step {turn}: " + "please look at this file content " * 60})
        messages.append({"role": "assistant", "content": f"done {turn} " + "here is the patch line " * 60})
        turn += 1
    messages.append({"role": "user", "content": "go on"})
    tools = [{"type": "function", "function": {"name": f"tool{k}", "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}} for k in range(20)]
    return orjson.dumps({"model": "gpt-4o-mini", "messages": messages, "tools": tools})


def make_records(n: int, stream_every: int = 4, body: bytes = BODY) -> list[RequestRecord]:
    out = []
    for i in range(n):
        r = RequestRecord("POST", "/v1/chat/completions")
        r.model, r.provider, r.upstream_model = "gpt-4o-mini", "fake", "gpt-4o-mini"
        r.request_body = body
        r.session_id = r.chat_id = f"s{i % SESSIONS}"
        r.log_line = True
        if stream_every and i % stream_every == stream_every - 1:  # by default one in four, as in the memory test
            r.stream, r.stream_body, r.reply_format = True, STREAM, "stream"
        else:
            r.stream, r.response_body, r.reply_format = False, REPLY, "completion"
        r.finish(200, "ok")
        out.append(r)
    return out


async def measure(n: int, stream_every: int = 4, body: bytes = BODY) -> dict[str, float]:
    """Submit `n` records as fast as possible; time until all are committed."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.db"
        conn = await connect(path)
        writer = LogWriter(str(path), max_queue=n, secrets=["sk-bench-secret"])
        # The writer process renders each record's log line to its stderr, the daemon's:
        # here a file, as under a service manager, instead of this script's output.
        saved = os.dup(2)
        with open(Path(tmp) / "daemon.log", "wb") as lines:
            os.dup2(lines.fileno(), 2)
            try:
                await writer.start()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
        repo, now = SessionRepo(conn, writer), time.time()
        for k in range(SESSIONS):
            repo.create(Session(f"s{k}", f"fp{k}", "bench", "fake", "gpt-4o-mini", now, now, now + 1800, chat_id=f"s{k}"))
        await writer.drained()
        pid = writer.process.pid  # type: ignore[union-attr]
        records = make_records(n, stream_every, body)
        t0, c0, w0 = time.perf_counter(), time.process_time(), _cpu_s(pid)
        for r in records:
            writer.submit(r)
        await writer.drained()
        wall, cpu, wcpu = time.perf_counter() - t0, time.process_time() - c0, _cpu_s(pid) - w0
        await writer.stop()
        await conn.close()
        stored = sqlite3.connect(path).execute("SELECT count(*) FROM requests").fetchone()[0]
    return {
        "records_per_s": n / wall,
        "cpu_us_per_record": 1e6 * (cpu + wcpu) / n,
        "daemon_cpu_us_per_record": 1e6 * cpu / n,
        "lost": n - stored,
        "dropped": writer.dropped,
        "failed": writer.failed,
    }


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _assembly_us(n: int = 2000, read: Callable[[bytes], object] = assemble_stream) -> float:
    """CPU per assembly of one forwarded 64-chunk stream (text, usage, finish reason, count)."""
    bodies = [bytes(STREAM) for _ in range(n)]
    c0 = time.process_time()
    for body in bodies:
        read(body)
    return 1e6 * (time.process_time() - c0) / n


def _events_by_parser(data: bytes) -> list[object]:
    """A stream's events as the SSE parser alone reads them: what `replies.stream_events`
    does for a body not framed the usual way, and would do for every body without its
    one-call read."""
    out = []
    for ev in SSEParser().feed(data + b"\n\n"):
        if ev.data and ev.data != "[DONE]":
            out.append(orjson.loads(ev.data))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--records", type=int, default=50_000, help="records per run (default: %(default)s)")
    ap.add_argument("--history-kb", type=int, default=0, help="an agent-sized request history of about this many KB")
    args = ap.parse_args()
    if args.history_kb:
        body = agent_body(args.history_kb)
        out = asyncio.run(measure(args.records, body=body)) | {"request_body_bytes": len(body)}
        print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
        return
    out = asyncio.run(measure(args.records))
    plain = asyncio.run(measure(args.records, stream_every=0))
    out |= {"plain_records_per_s": plain["records_per_s"], "plain_cpu_us_per_record": plain["cpu_us_per_record"]}
    out |= {"plain_lost": plain["lost"], "stream_assembly_us": _assembly_us()}
    out |= {"stream_events_us": _assembly_us(read=stream_events), "stream_events_parser_us": _assembly_us(read=_events_by_parser)}
    print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
