"""How the log writer should hand a batch of request rows to PostgreSQL: four ways of
writing the same rows into the real (partitioned, indexed) `requests` table, each in one
transaction per batch, interleaved in rounds so that a growing table or a noisy neighbour
weighs on all alike. Starts a throwaway server (tests/postgres.py) unless given --dsn.

    .venv/bin/python bench/pg_writes.py [--rows 2000] [--batch 200] [--rounds 5] [--dsn URL]
    .venv/bin/python bench/pg_writes.py --writer [--rows 5000] [--history-kb 60]

Prints JSON: rows per second per way (median of the rounds), and each way's ratio to
executemany; with --writer, the whole log writer's records per second on SQLite and on
PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from provider_router.records import iso, new_id  # noqa: E402
from provider_router.store.pg import writer  # noqa: E402
from provider_router.store.pg.migrations import migrate  # noqa: E402
from provider_router.store.rows import COLUMNS, INSERT_REQUEST  # noqa: E402

Write = Callable[[psycopg.Cursor[Any], list[tuple[Any, ...]]], None]


def row(now: float) -> tuple[Any, ...]:
    """A request row of the usual shape: a chat request, its reply's metadata (~0.5 KB)."""
    values: dict[str, Any] = dict.fromkeys(COLUMNS)
    response = {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(now), "model": "gpt-4o-mini",
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": 812, "completion_tokens": 97, "total_tokens": 909}}  # fmt: skip
    values.update(
        id=new_id(), received_at=iso(now), finished_at=iso(now + 0.8), method="POST", path="/v1/chat/completions",
        client="alice", user_agent="OpenAI/Python 1.54.0", model="gpt-4o-mini", provider="openai",
        upstream_model="gpt-4o-mini", stream=1, status=200, outcome="ok", finish_reason="stop", prompt_tokens=812,
        completion_tokens=97, total_tokens=909, cached_tokens=0, chunk_count=99, ttfb_ms=312.123, duration_ms=801.5,
        session_id=uuid.uuid4().hex, turn=4, tip_message=random.randrange(1 << 40), prompt_message=random.randrange(1 << 40),
        reply_message=random.randrange(1 << 40), params='{"model":"gpt-4o-mini","stream":true,"temperature":0.7}',
        response=json.dumps(response),
    )  # fmt: skip
    return tuple(values[c] for c in COLUMNS)


def executemany(cur: psycopg.Cursor[Any], rows: list[tuple[Any, ...]]) -> None:
    cur.executemany(INSERT_REQUEST.replace("?", "%s"), rows)  # psycopg >= 3.1: pipelined, one round trip


def values(cur: psycopg.Cursor[Any], rows: list[tuple[Any, ...]]) -> None:
    per = 65535 // len(COLUMNS)  # parameters per statement are at most 65535
    one = "(" + ", ".join(["%s"] * len(COLUMNS)) + ")"
    for i in range(0, len(rows), per):
        chunk = rows[i : i + per]
        cur.execute(f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES " + ", ".join([one] * len(chunk)), [v for r in chunk for v in r])


def unnest(cur: psycopg.Cursor[Any], rows: list[tuple[Any, ...]]) -> None:
    writer.unnest_insert(cur, "requests", COLUMNS, writer.REQUEST_TYPES, rows)


def copy(cur: psycopg.Cursor[Any], rows: list[tuple[Any, ...]]) -> None:
    writer.copy_rows(cur, "requests", COLUMNS, rows)


WAYS: dict[str, Write] = {"executemany": executemany, "multi-row VALUES": values, "INSERT ... unnest": unnest, "COPY": copy}


def run(dsn: str, rows: int, batch: int, rounds: int) -> dict[str, Any]:
    migrate(dsn)
    samples: dict[str, list[float]] = {k: [] for k in WAYS}
    now = time.time()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT request_partitions(current_date - 1, current_date + 1)")
        for _ in range(rounds):
            for name, write in random.sample(list(WAYS.items()), len(WAYS)):
                data = [row(now) for _ in range(rows)]
                t0 = time.perf_counter()
                for i in range(0, rows, batch):
                    with conn.transaction(), conn.cursor() as cur:
                        write(cur, data[i : i + batch])
                samples[name].append(rows / (time.perf_counter() - t0))
        (n,) = conn.execute("SELECT count(*) FROM requests").fetchone()  # type: ignore[misc]
    assert n == rows * rounds * len(WAYS), n
    base = statistics.median(samples["executemany"])
    return {
        "rows": rows, "batch": batch, "rounds": rounds,
        "rows_per_s": {k: round(statistics.median(v)) for k, v in samples.items()},
        "vs_executemany": {k: round(statistics.median(v) / base, 2) for k, v in samples.items()},
    }  # fmt: skip


def writer(dsn: str, records: int, batch: int, rounds: int, history_kb: int) -> dict[str, Any]:
    """The whole writer (sink.Sink: assembling, the tree, redaction, rows, the write) in
    this process, into a SQLite file and into PostgreSQL, the same records (those of
    bench/log_writer.py: one in four a 64-chunk stream, 100 conversations), in batches,
    interleaved in rounds: records per second and CPU per record of this process."""
    import tempfile

    from bench.log_writer import BODY, agent_body, make_records
    from provider_router.redact import Redactor
    from provider_router.store import sink
    from provider_router.store.migrations import migrate_file
    from provider_router.store.pg.writer import PgTarget

    migrate(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:  # the days ahead, as a running instance has them
        conn.execute("SELECT request_partitions(current_date - 1, current_date + 8)")
    body = agent_body(history_kb) if history_kb else BODY
    rates: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
    cpu: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(rounds):
            for name in random.sample(list(rates), 2):
                if name == "sqlite":
                    path = f"{tmp}/w{k}.db"
                    migrate_file(path)
                    target: Any = sink.open_db(path)
                else:
                    target = PgTarget(dsn)
                out = sink.Sink(target, max_body_bytes=1 << 20, redactor=Redactor(["sk-bench-secret"]), emit=lambda _: None)
                recs = make_records(records, body=body)
                t0, c0 = time.perf_counter(), time.process_time()
                for i in range(0, records, batch):
                    out.apply([([], recs[i : i + batch])])
                wall, used = time.perf_counter() - t0, time.process_time() - c0
                assert out.written == records and out.failed == 0, (out.written, out.failed)
                rates[name].append(records / wall)
                cpu[name].append(1e6 * used / records)
                target.close()
    return {
        "records": records, "batch": batch, "rounds": rounds, "history_kb": history_kb,
        "records_per_s": {k: round(statistics.median(v)) for k, v in rates.items()},
        "writer_cpu_us_per_record": {k: round(statistics.median(v), 1) for k, v in cpu.items()},
        "postgresql_vs_sqlite": round(statistics.median(rates["postgresql"]) / statistics.median(rates["sqlite"]), 2),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--writer", action="store_true", help="the whole writer, SQLite against PostgreSQL (--rows records)")
    ap.add_argument("--history-kb", type=int, default=0, help="with --writer: agent-sized request histories")
    ap.add_argument("--dsn")
    a = ap.parse_args()

    def one(dsn: str) -> dict[str, Any]:
        if a.writer:
            return writer(dsn, a.rows, a.batch, a.rounds, a.history_kb)
        return run(dsn, a.rows, a.batch, a.rounds)

    if a.dsn:
        print(json.dumps(one(a.dsn), indent=1))
        return
    from tests.postgres import running_server

    with running_server() as server:
        with psycopg.connect(server.dsn(), autocommit=True) as admin:
            admin.execute("CREATE DATABASE bench")
        print(json.dumps(one(server.dsn("bench")), indent=1))


if __name__ == "__main__":
    main()
