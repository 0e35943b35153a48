"""The conversation-tree log at scale (issue 13's targets): database size, writer throughput
and inspection time, each phase on a fresh database, printed as one JSON object.

Phases (`--phase`, one per run; run.py runs each in its own process):

- `conversation`: one 200-turn conversation of 2 KB user messages through a real proxy
  daemon (the built-in echo model) with the official `openai` SDK, each request resending
  the whole history; the file size after `PRAGMA wal_checkpoint(TRUNCATE)` against the
  distinct message text (every message's content, counted once).
- `oneshot`: N one-shot requests (a short system prompt, a user question, the reply JSON
  as OpenAI sends it, compact; with `--minimal`, only the fields every compatible server
  sends) handed to the real log writer process (`LogWriter.submit`
  of `RequestRecord`s shaped as the daemon makes them: no session row); database bytes
  per request against the request + response body bytes per request.
- `scale`: N requests (a mix of models, providers, clients, outcomes, streams, some
  conversations with session rows, a rare word in a few prompts, timestamps over 30 days)
  built through the real writer, then the query time of `stats`, `logs -n 20` with each
  single filter, `logs -q WORD` and `sessions list` (in process, the CLI's own query
  functions on a read-only connection like the CLI's), of `GET /admin/stats` against a real
  daemon on that file, and the CLI's wall time with Python start-up. Medians of a few runs.
- `agent`: agent-shaped traffic through the real writer: conversations whose histories
  grow turn by turn to 60 KB (user ~2 KB, assistant ~1.5 KB a turn, the same few-KB tools
  list in every request), records/s until all are committed and CPU per record (the
  daemon's pickling plus the writer process). With `--old-commit C` it also runs C's
  `bench/log_writer.py --history-kb 60` (extracted with `git archive`) as the baseline.

Run: .venv/bin/python bench/store.py --phase scale [--requests N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import orjson
import structlog

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from provider_router.store import LogWriter, RequestRecord, connect  # noqa: E402
from provider_router.store import queries as q  # noqa: E402
from provider_router.store import session_reads  # noqa: E402
from provider_router.store import stats as stats_q  # noqa: E402
from provider_router.store.rows import ROLLUP_SUMS  # noqa: E402
from provider_router.store.sessions import Session, SessionRepo  # noqa: E402

ADMIN_KEY = "bench-admin"
DAY = 86400.0
RARE_WORD = "zyzzogeton"
WORDS = (
    "file function test error build deploy cache index query table schema value network "
    "request response token model stream buffer thread lock queue worker parse format "
    "config route proxy client server python rust module package import export retry "
    "timeout limit batch commit branch merge review patch docs example output input"
).split()
USER_AGENT = "OpenAI/Python 1.57.0"
SYSTEM = "You are a helpful assistant. Answer briefly and precisely."


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def text_of_size(rng: random.Random, prefix: str, size: int) -> str:
    """Distinct text of about `size` bytes, starting with `prefix`."""
    out = prefix
    while len(out) < size:
        out += " " + words(rng, 12)
    return out[:size]


def completion_body(rng: random.Random, model: str, content: str, prompt_tokens: int, minimal: bool = False) -> bytes:
    """A non-stream reply with the fields OpenAI sends (compact JSON); `minimal`: only the
    fields every OpenAI-compatible server sends."""
    completion_tokens = len(content.split())
    if minimal:
        return orjson.dumps({
            "id": f"chatcmpl-{rng.getrandbits(64):016x}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })
    return orjson.dumps({
        "id": f"chatcmpl-{rng.getrandbits(96):024x}", "object": "chat.completion",
        "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": None,
                                             "annotations": []},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens,
                  "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                                "accepted_prediction_tokens": 0,
                                                "rejected_prediction_tokens": 0}},
        "service_tier": "default", "system_fingerprint": "fp_0ba0d124f1",
    })


def stream_body(model: str, content: str, prompt_tokens: int) -> bytes:
    """The SSE body of a streamed reply: a role chunk, one chunk per few words, a finish
    chunk, a usage chunk and [DONE]."""
    base = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    parts = content.split(" ")
    pieces = [" ".join(parts[i:i + 4]) + " " for i in range(0, len(parts), 4)]
    deltas = [{"role": "assistant", "content": ""}] + [{"content": p} for p in pieces]
    events = [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    events.append({**base, "choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                    "completion_tokens": len(parts),
                                                    "total_tokens": prompt_tokens + len(parts)}})
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def file_bytes(path: Path) -> int:
    """The database's size after folding the WAL into the main file."""
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


async def start_writer(path: Path, log_to: Path) -> tuple[Any, LogWriter]:
    """A migrated database and a started LogWriter on it, as the daemon makes them; the
    writer process's log lines go to `log_to` (they would go to the daemon's stderr)."""
    conn = await connect(path)
    writer = LogWriter(str(path))
    saved = os.dup(2)
    with open(log_to, "ab") as lines:
        os.dup2(lines.fileno(), 2)
        try:
            await writer.start()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return conn, writer


def new_record(started: float, model: str, provider: str, client: str, body: bytes) -> RequestRecord:
    r = RequestRecord("POST", "/v1/chat/completions")
    r.model, r.upstream_model, r.provider, r.client = model, model, provider, client
    r.user_agent, r.request_body, r.log_line = USER_AGENT, body, True
    r.started = started
    return r


def finish(r: RequestRecord, status: int, outcome: str, ttfb_ms: float, duration_ms: float) -> None:
    r.finish(status, outcome)
    r.finished = r.started + duration_ms / 1000
    r.ttfb_ms, r.duration_ms = ttfb_ms, duration_ms


# ---------------------------------------------------------------- conversation


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], key: str | None = None, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with code {proc.returncode}")
        try:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"no answer at {url} after {timeout_s:.0f} s")


class Daemon:
    """`python -m provider_router serve` on a database, with an echo model and an admin
    key; stopped with SIGTERM (it flushes every log record first)."""

    def __init__(self, tmp: Path, db: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.config = tmp / "config.yaml"
        self.config.write_text(
            "server: {host: 127.0.0.1, port: %d}\n"
            "database: {path: %s}\n"
            "auth: {admin_key: %s}\n"
            "providers:\n  - {name: echo, type: echo}\n"
            "models:\n  - {name: \"*\", provider: echo}\n" % (self.port, orjson.dumps(str(db)).decode(), ADMIN_KEY)
        )
        argv = [sys.executable, "-m", "provider_router", "serve", "--config", str(self.config),
                "--port", str(self.port), "--db", str(db)]
        self.log = open(tmp / "daemon.log", "ab")
        self.proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self) -> Daemon:
        try:
            wait_http(self.base + "/v1/models", self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def phase_conversation(tmp: Path, turns: int, message_bytes: int) -> dict[str, Any]:
    from openai import OpenAI

    db = tmp / "conversation.db"
    rng = random.Random(1)
    messages: list[dict[str, str]] = []
    t0 = time.perf_counter()
    with Daemon(tmp, db) as daemon:
        client = OpenAI(base_url=daemon.base + "/v1", api_key="unused", max_retries=0, timeout=60)
        for turn in range(1, turns + 1):
            messages.append({"role": "user", "content": text_of_size(rng, f"turn {turn}:", message_bytes)})
            reply = client.chat.completions.create(model="echo", messages=messages)  # type: ignore[arg-type]
            messages.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
    wall = time.perf_counter() - t0
    distinct = sum(len(m["content"].encode()) for m in messages)
    size = file_bytes(db)
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT count(*) FROM requests").fetchone()[0]
        nodes = c.execute("SELECT count(*) FROM messages").fetchone()[0]
    return {"turns": turns, "message_bytes": message_bytes, "db_bytes": size, "distinct_text_bytes": distinct,
            "ratio": size / distinct, "request_rows": rows, "message_rows": nodes, "wall_s": wall}


# ---------------------------------------------------------------- one-shot requests


def oneshot_records(n: int, minimal: bool, seed: int = 2) -> Iterator[tuple[RequestRecord, int]]:
    """One-shot requests as the daemon hands them over (a fresh stateless session each,
    no session row), and each one's request + response body bytes."""
    rng = random.Random(seed)
    start = time.time() - DAY
    for i in range(n):
        question = f"{words(rng, 3).capitalize()}: how do I {words(rng, 10)}?"
        body = orjson.dumps({"model": "gpt-4o-mini", "messages": [
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]})
        reply = completion_body(rng, "gpt-4o-mini-2024-07-18", words(rng, 14).capitalize() + ".", 31, minimal)
        r = new_record(start + i * DAY / n, "gpt-4o-mini", "openai", "default", body)
        r.session_id = r.chat_id = f"{rng.getrandbits(64):016x}"
        r.log_session = False
        r.stream, r.response_body, r.reply_format = False, reply, "completion"
        finish(r, 200, "ok", 180.0, 420.0)
        yield r, len(body) + len(reply)


async def fill(writer: LogWriter, records: Iterator[Any]) -> dict[str, float]:
    """Submit everything `records` yields (waiting for room as the daemon's requests do);
    time until all are committed. Items are records or callables (a state change to queue)."""
    t0 = time.perf_counter()
    n = 0
    for item in records:
        if callable(item):
            item()
            continue
        await writer.room()
        writer.submit(item)
        n += 1
        if n % 1000 == 0:
            await asyncio.sleep(0)  # let the hand-over timer run, as it does between requests
    await writer.drained()
    return {"records": n, "fill_s": time.perf_counter() - t0}


def phase_oneshot(tmp: Path, n: int, minimal: bool) -> dict[str, Any]:
    db = tmp / "oneshot.db"
    body_bytes = 0

    def counted() -> Iterator[RequestRecord]:
        nonlocal body_bytes
        for r, size in oneshot_records(n, minimal):
            body_bytes += size
            yield r

    async def run() -> dict[str, float]:
        conn, writer = await start_writer(db, tmp / "writer.log")
        try:
            return await fill(writer, counted())
        finally:
            await writer.stop()
            await conn.close()

    out = asyncio.run(run())
    size = file_bytes(db)
    per_body = body_bytes / n
    return {**out, "db_bytes": size, "db_bytes_per_request": size / n, "body_bytes_per_request": per_body,
            "target_bytes_per_request": per_body * 1.5 + 300}


# ---------------------------------------------------------------- 1M requests, then queries


ROUTES = [("gpt-4o-mini", "openai"), ("gpt-4o", "openai"), ("openrouter/anthropic/claude-3.5-sonnet", "openrouter"),
          ("llama3.1:8b", "local"), ("qwen2.5-coder:7b", "local"), ("echo", "echo")]
CLIENTS = ["ide", "ci", "notebook", "agent", "web"]
# (weight, status, outcome)
OUTCOMES = [(950, 200, "ok"), (20, 502, "upstream_error"), (10, 429, "upstream_error"),
            (10, 499, "client_disconnected"), (5, 504, "upstream_timeout"), (5, 400, "invalid_request")]
CONVERSATION_EVERY = 20  # one record in this many is a turn of a conversation ...
CONVERSATION_TURNS = 10  # ... of this many turns, in consecutive slots
RARE_EVERY = 50_000  # a prompt with the rare word


def scale_records(n: int, repo: SessionRepo, seed: int = 3) -> Iterator[Any]:
    """The mixed log, oldest first, spread evenly over 30 days up to now; session rows are
    queued (a callable) before a conversation's first turn."""
    rng = random.Random(seed)
    span, end = 30 * DAY, time.time()
    step = span / n
    weights = [w for w, _, _ in OUTCOMES]
    history: list[dict[str, str]] = []
    session: Session | None = None
    for i in range(n):
        started = end - span + i * step
        model, provider = ROUTES[i % len(ROUTES)] if i % 7 else ROUTES[rng.randrange(len(ROUTES))]
        client = CLIENTS[(i // 3) % len(CLIENTS)]
        question = f"{words(rng, 2).capitalize()}: how do I {words(rng, 12)}?"
        if i % RARE_EVERY == 17:
            question += f" It mentions {RARE_WORD}."
        slot = i // CONVERSATION_EVERY
        in_conversation = i % CONVERSATION_EVERY == 0
        if in_conversation:
            turn = slot % CONVERSATION_TURNS
            if turn == 0:
                history = [{"role": "system", "content": SYSTEM}]
                last = started + (CONVERSATION_TURNS - 1) * CONVERSATION_EVERY * step
                session = Session(f"conv{slot:08d}", f"fp{slot}", CLIENTS[slot % len(CLIENTS)], provider, model,
                                  started, last, last + 1800, chat_id=f"conv{slot:08d}",
                                  state="expired" if last + 1800 < end else "active",
                                  message_count=2 * CONVERSATION_TURNS + 1, request_count=CONVERSATION_TURNS)
                yield (lambda s=session: repo.create(s))
            assert session is not None
            model, provider, client = session.upstream_model, session.provider, session.client
            history.append({"role": "user", "content": question})
            messages = list(history)
        else:
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        stream = i % 4 == 3
        body = orjson.dumps({"model": model, "messages": messages, **({"stream": True} if stream else {})})
        r = new_record(started, model, provider, client, body)
        _, status, outcome = rng.choices(OUTCOMES, weights)[0]
        if in_conversation:
            r.session_id = r.chat_id = session.id  # type: ignore[union-attr]
        else:
            r.session_id = r.chat_id = f"{rng.getrandbits(64):016x}"
            r.log_session = False
        r.stream = stream
        if status == 200:
            answer = words(rng, 20).capitalize() + "."
            tokens = 12 * len(messages)
            if stream:
                r.stream_body, r.reply_format = stream_body(model, answer, tokens), "stream"
            else:
                r.response_body, r.reply_format = completion_body(rng, model, answer, tokens), "completion"
            if in_conversation:
                history.append({"role": "assistant", "content": answer})
        elif status != 499:
            r.response_body = orjson.dumps({"error": {"message": f"upstream said {status}", "type": "upstream_error"}})
        duration = rng.lognormvariate(6.5, 0.8)
        finish(r, status, outcome, duration * 0.3, duration)
        yield r


def median_ms(fn: Any, runs: int) -> float:
    """Median wall time of `fn()` over `runs` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def logs_filters(session_id: str) -> dict[str, tuple[q.RequestFilter, list[str]]]:
    """Each `logs -n 20` case: its filter and the same filter as CLI arguments."""
    return {
        "--model": (q.RequestFilter(model="gpt-4o"), ["--model", "gpt-4o"]),
        "--provider": (q.RequestFilter(provider="openrouter"), ["--provider", "openrouter"]),
        "--client": (q.RequestFilter(client="ci"), ["--client", "ci"]),
        "--status": (q.RequestFilter(status=504), ["--status", "504"]),
        "--outcome": (q.RequestFilter(outcome="client_disconnected"), ["--outcome", "client_disconnected"]),
        "--since 1h": (q.RequestFilter(since=q.cutoff("1h")), ["--since", "1h"]),
        "--session": (q.RequestFilter(session=session_id), ["--session", session_id]),
        f"-q {RARE_WORD}": (q.RequestFilter(query=RARE_WORD), ["-q", RARE_WORD]),
        "-q file": (q.RequestFilter(query="file"), ["-q", "file"]),  # a word in most messages
    }


async def query_times(db: Path, runs: int) -> tuple[dict[str, float], dict[str, int], str]:
    """Query time of each inspection read, in process, on a read-only connection as the CLI
    opens it; how many rows each listing returned; a session id to filter on."""
    conn = await connect(db, readonly=True, migrate_schema=False)
    try:
        sessions = await session_reads.list_sessions(conn, limit=20)
        session_id = sessions[0]["id"] if sessions else "none"
        loop = asyncio.get_running_loop()
        times: dict[str, float] = {}
        found: dict[str, int] = {}

        async def timed(name: str, call: Any) -> None:
            samples = []
            result = await call()
            for _ in range(runs):
                t0 = loop.time()
                result = await call()
                samples.append((loop.time() - t0) * 1000)
            times[name] = statistics.median(samples)
            if isinstance(result, q.RequestPage):
                found[name] = len(result.rows)
            elif isinstance(result, list):
                found[name] = len(result)

        await timed("stats", lambda: stats_q.stats(conn))
        for name, (flt, _) in logs_filters(session_id).items():
            await timed(f"logs {name}", lambda flt=flt: q.recent_requests(conn, flt, 20))
        await timed("sessions list", lambda: session_reads.list_sessions(conn, limit=20))
        return times, found, session_id
    finally:
        await conn.close()


def query_plans(db: Path, session_id: str) -> dict[str, list[str]]:
    """EXPLAIN QUERY PLAN of each `logs` listing, built as `queries.recent_requests` builds it,
    and of the roll-ups' sum that `stats` reads (as `queries.stats` builds it, all time)."""
    plans = {}
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        for name, (flt, _) in logs_filters(session_id).items():
            where, params = flt.where()
            where += (" AND " if where else " WHERE ") + "r.rowid <= ?"
            params.append(1 << 62)
            if flt.since:
                where += " AND r.rowid >= ?"
                params.append(1)
            sql = f"{q._LISTED}{where} ORDER BY r.rowid DESC LIMIT 20"
            plans[f"logs {name}"] = [row[-1] for row in c.execute("EXPLAIN QUERY PLAN " + sql, params)]
        sums = ", ".join(f"sum({col})" for col in ROLLUP_SUMS)
        stats_sql = f"SELECT model, provider, {sums} FROM rollups GROUP BY model, provider"
        plans["stats"] = plans["/admin/stats"] = [row[-1] for row in c.execute("EXPLAIN QUERY PLAN " + stats_sql)]
        plans["rollups rows"] = [str(c.execute("SELECT count(*) FROM rollups").fetchone()[0])]
    return plans


def cli_times(db: Path, config: Path, session_id: str, runs: int) -> dict[str, float]:
    """Wall time of the real command (`provider-router ... --db`), Python start-up included."""
    exe = str(Path(sys.executable).parent / "provider-router")
    commands = {"stats": ["stats"], "sessions list": ["sessions", "list"]}
    commands |= {f"logs {name}": ["logs", "-n", "20", *args] for name, (_, args) in logs_filters(session_id).items()}
    out = {}
    for name, args in commands.items():
        argv = [exe, *args, "--config", str(config), "--db", str(db)]
        out[name] = median_ms(lambda: subprocess.run(argv, capture_output=True, check=True, timeout=120), runs)
    return out


def admin_stats_ms(tmp: Path, db: Path, runs: int) -> float:
    with Daemon(tmp, db) as daemon:
        request = urllib.request.Request(daemon.base + "/admin/stats", headers={"Authorization": f"Bearer {ADMIN_KEY}"})

        def get() -> None:
            with urllib.request.urlopen(request, timeout=120) as resp:
                resp.read()

        return median_ms(get, runs)


def ui_pages(db: Path, session_id: str) -> dict[str, str]:
    """The dashboard's pages timed at scale (a row each): the list, filtered, searched (a
    rare word, and a word in most prompts), one request, one session's tree, the stats."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        sql = "SELECT id FROM requests WHERE path = '/v1/chat/completions' ORDER BY rowid DESC LIMIT 1"
        (request_id,) = c.execute(sql).fetchone()  # the newest chat request (a daemon asks /v1/models)
    return {
        "/ui/": "/ui/",
        "/ui/?model=gpt-4o": "/ui/?model=gpt-4o",
        f"/ui/?q={RARE_WORD}": f"/ui/?q={RARE_WORD}",
        "/ui/?q=file (a common word)": "/ui/?q=file",
        "/ui/requests/ID": f"/ui/requests/{request_id}",
        "/ui/sessions/ID": f"/ui/sessions/{session_id}",
        **{f"/ui/stats?range={r}": f"/ui/stats?range={r}" for r in ("1h", "24h", "7d", "30d")},
    }


def ui_ms(tmp: Path, db: Path, runs: int, session_id: str) -> dict[str, float]:
    """Each dashboard page's time over HTTP against a real daemon on the file (median)."""
    pages = ui_pages(db, session_id)
    out = {}
    with Daemon(tmp, db) as daemon:
        for name, path in pages.items():
            request = urllib.request.Request(daemon.base + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"})

            def get(request: urllib.request.Request = request) -> None:
                with urllib.request.urlopen(request, timeout=120) as resp:
                    resp.read()

            out[name] = median_ms(get, runs)
    return out


def phase_scale(tmp: Path, n: int, runs: int, reuse: Path | None) -> dict[str, Any]:
    db = reuse or tmp / "scale.db"

    async def build() -> dict[str, float]:
        conn, writer = await start_writer(db, tmp / "writer.log")
        try:
            return await fill(writer, scale_records(n, SessionRepo(conn, writer)))
        finally:
            await writer.stop()
            await conn.close()

    built = asyncio.run(build()) if reuse is None else {"records": n, "fill_s": float("nan")}
    size = file_bytes(db)
    times, found, session_id = asyncio.run(query_times(db, runs))
    out: dict[str, Any] = {**built, "db_bytes": size, "query_ms": times, "rows_found": found}
    out["query_ms"]["/admin/stats"] = admin_stats_ms(tmp, db, runs)
    out["ui_ms"] = ui_ms(tmp, db, runs, session_id)
    out["cli_ms"] = cli_times(db, tmp / "config.yaml", session_id, max(3, runs // 2))
    slow = {k for k, v in out["query_ms"].items() if v > 100}
    out["plans"] = {k: v for k, v in query_plans(db, session_id).items() if k in slow or k == "rollups rows"}
    return out


# ---------------------------------------------------------------- agent-shaped traffic


def agent_tools() -> list[dict[str, Any]]:
    """A coding agent's tools list, a few KB, the same in every request."""
    names = ["read_file", "write_file", "edit_file", "list_dir", "grep", "run_command", "run_tests", "git_diff"]
    return [{"type": "function", "function": {
        "name": name, "description": f"{name.replace('_', ' ').capitalize()}: " + "use it when the task needs it; " * 8,
        "parameters": {"type": "object", "properties": {
            "path": {"type": "string", "description": "a path relative to the repository root"},
            "pattern": {"type": "string", "description": "a regular expression or literal text"},
            "content": {"type": "string", "description": "the full new content, or the replacement text"},
        }, "required": ["path"]}}} for name in names]


def agent_records(n: int, repo: SessionRepo, history_bytes: int, at_once: int, seed: int = 4) -> list[Any]:
    """`at_once` conversations interleaved turn by turn, each growing until its history
    reaches `history_bytes`, then replaced by a new one; session rows queued first."""
    rng = random.Random(seed)
    tools = agent_tools()
    system = {"role": "system", "content": "You are a coding agent working in a repository. " * 40}
    out: list[Any] = []
    slots: list[tuple[Session, list[dict[str, str]], int]] = []
    started = 0
    now = time.time()
    made = 0
    while made < n:
        for k in range(at_once):
            if k >= len(slots) or slots[k][2] >= history_bytes:
                sid = f"agent{started:06d}"
                started += 1
                s = Session(sid, f"fp-{sid}", "agent", "openai", "gpt-4o", now, now, now + 1800, chat_id=sid)
                out.append(lambda s=s: repo.create(s))
                entry = (s, [system], 0)
                if k < len(slots):
                    slots[k] = entry
                else:
                    slots.append(entry)
            s, history, _ = slots[k]
            history.append({"role": "user", "content": text_of_size(rng, f"{s.id} turn {len(history) // 2}:", 2048)})
            body = orjson.dumps({"model": "gpt-4o", "messages": history, "tools": tools})
            answer = text_of_size(rng, f"{s.id} answer:", 1536)
            r = new_record(now, "gpt-4o", "openai", "agent", body)
            r.session_id = r.chat_id = s.id
            r.stream, r.response_body, r.reply_format = False, completion_body(rng, "gpt-4o", answer, len(body) // 4), "completion"
            finish(r, 200, "ok", 300.0, 2500.0)
            out.append(r)
            made += 1
            history.append({"role": "assistant", "content": answer})
            slots[k] = (s, history, len(body))
    return out


def phase_agent(tmp: Path, n: int, history_kb: int, old_commit: str | None) -> dict[str, Any]:
    db = tmp / "agent.db"

    async def run() -> dict[str, float]:
        conn, writer = await start_writer(db, tmp / "writer.log")
        try:
            items = agent_records(n, SessionRepo(conn, writer), history_kb * 1024, at_once=32)
            records = [r for r in items if isinstance(r, RequestRecord)]
            body_bytes = sum(len(r.request_body or b"") for r in records)
            body_max = max(len(r.request_body or b"") for r in records)  # bodies are let go once handed over
            await writer.drained()  # the writer process has started and opened the database
            assert writer.process is not None
            pid = writer.process.pid
            t0, c0, w0 = time.perf_counter(), time.process_time(), cpu_s(pid)
            for item in items:
                item() if callable(item) else writer.submit(item)
            await writer.drained()
            wall, cpu, wcpu = time.perf_counter() - t0, time.process_time() - c0, cpu_s(pid) - w0
            lost = len(records) - (await (await conn.execute("SELECT count(*) FROM requests")).fetchone())[0]
            return {"records": len(records), "records_per_s": len(records) / wall,
                    "cpu_us_per_record": 1e6 * (cpu + wcpu) / len(records),
                    "writer_cpu_us_per_record": 1e6 * wcpu / len(records),
                    "request_body_bytes_mean": body_bytes / len(records),
                    "request_body_bytes_max": body_max, "lost": lost}
        finally:
            await writer.stop()
            await conn.close()

    out: dict[str, Any] = asyncio.run(run())
    out["db_bytes"] = file_bytes(db)
    if old_commit:
        out["old"] = old_writer(tmp, old_commit, history_kb)
    return out


def old_writer(tmp: Path, commit: str, history_kb: int) -> dict[str, Any] | None:
    """`bench/log_writer.py --history-kb K` of an older commit, on this machine now."""
    src = tmp / "old"
    src.mkdir()
    archive = subprocess.run(["git", "archive", commit, "bench", "provider_router"], cwd=REPO, capture_output=True)
    if archive.returncode != 0:
        return None
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
    done = subprocess.run([sys.executable, str(src / "bench" / "log_writer.py"), "--records", "5000",
                           "--history-kb", str(history_kb)], capture_output=True, text=True, timeout=300,
                          cwd=src, env={**os.environ, "PYTHONPATH": str(src)})
    if done.returncode != 0:
        return None
    return {"commit": commit, **orjson.loads(done.stdout)}


# ---------------------------------------------------------------- main


def main() -> None:
    # The daemon's side of the writer logs (e.g. a full queue) with structlog: to stderr,
    # so that stdout carries only this script's JSON.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--phase", required=True, choices=["conversation", "oneshot", "scale", "agent"])
    ap.add_argument("--turns", type=int, default=200, help="conversation: turns (default: %(default)s)")
    ap.add_argument("--message-bytes", type=int, default=2048, help="conversation: user message size")
    ap.add_argument("--requests", type=int, help="oneshot: default 200000; scale: default 1000000; agent: 20000")
    ap.add_argument("--minimal", action="store_true", help="oneshot: replies with only the core fields")
    ap.add_argument("--runs", type=int, default=5, help="scale: timed runs per query (default: %(default)s)")
    ap.add_argument("--reuse-db", type=Path, help="scale: time the queries on this database, built before")
    ap.add_argument("--history-kb", type=int, default=60, help="agent: history size a conversation grows to")
    ap.add_argument("--old-commit", help="agent: also run this commit's bench/log_writer.py --history-kb")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (databases, logs)")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-store-{a.phase}-"))
    try:
        if a.phase == "conversation":
            out = phase_conversation(tmp, a.turns, a.message_bytes)
        elif a.phase == "oneshot":
            out = phase_oneshot(tmp, a.requests or 200_000, a.minimal)
        elif a.phase == "scale":
            out = phase_scale(tmp, a.requests or 1_000_000, a.runs, a.reuse_db)
        else:
            out = phase_agent(tmp, a.requests or 20_000, a.history_kb, a.old_commit)
    finally:
        if a.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            subprocess.run(["rm", "-rf", str(tmp)])
    print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
