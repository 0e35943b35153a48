"""The inspection commands of the CLI: `logs`, `sessions`, `stats` and `db`, registered on the
main parser by `register()`. It owns argument parsing and rendering (tables, transcripts,
conversation trees, JSON lines); the SQL lives in `store.queries` and `store.tree_view`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sqlite3
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Sequence

import aiosqlite
import orjson

from .store import queries as q
from .store import tree_view as tv
from .store.db import connect
from .store.presence import mark_path, serving

AddCommon = Callable[[argparse.ArgumentParser], None]
FOLLOW_INTERVAL = 0.5  # seconds between polls of `logs --follow`


class CliError(Exception):
    """A user-facing failure: printed as one line on stderr, exit status 1."""


# == opening the database ===============================================================
def resolve_db(args: argparse.Namespace) -> Path:
    """--db, else database.path of the --config file (./config.yaml), else the default."""
    if getattr(args, "db", None):
        return Path(args.db)
    return Path(_load_config(args).database.path)


def _load_config(args: argparse.Namespace) -> Any:
    """The --config file's config (./config.yaml by default)."""
    from .cli import load  # cli imports this module: import late

    if not hasattr(args, "config"):
        args.config = "config.yaml"
    return load(args)


async def open_db(path: Path, *, write: bool = False) -> aiosqlite.Connection:
    """A connection of our own: read-only unless `write`. Never migrates or creates the file.

    Readers never block the daemon (WAL). Writers get the project's PRAGMAs, notably
    busy_timeout (wait for the daemon's writer) and foreign_keys (session cascades).
    """
    if not path.is_file():
        raise CliError(f"no database at {path} (start `provider-router serve`, or pass --db PATH)")
    await _migrated(path)
    return await connect(path, readonly=not write, migrate_schema=False)


async def _migrated(path: Path) -> None:
    """A database an earlier release wrote is migrated first (with progress on stderr),
    unless a daemon serves it: that daemon migrates its own file when it starts."""
    from .store.migrations import MIGRATIONS, migrate_file

    def pending() -> bool:
        db = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
        try:
            done = {r[0] for r in db.execute("SELECT name FROM _migrations")}
        except sqlite3.OperationalError:  # no table yet: an empty file
            done = set()
        finally:
            db.close()
        return any(name not in done for name, _ in MIGRATIONS)

    if not pending():
        return
    if serving(path) is not None:
        raise CliError(f"the database at {path} is from an earlier release and a daemon serves it: restart the daemon (it migrates the file), then try again")

    def progress(what: str, done: int, total: int) -> None:
        print(f"migrating {path}: {what} {done}/{total}", file=sys.stderr, flush=True)

    print(f"migrating {path} to this release's schema (once)...", file=sys.stderr, flush=True)
    await asyncio.to_thread(migrate_file, str(path), progress)


def _run(args: argparse.Namespace, body: Callable[[aiosqlite.Connection], Awaitable[int]], *, write: bool = False) -> int:
    """Open the database, run `body`, close; user-facing errors become one line and exit 1."""

    async def main() -> int:
        conn = await open_db(resolve_db(args), write=write)
        try:
            return await body(conn)
        finally:
            await conn.close()

    try:
        return asyncio.run(main())
    except (CliError, q.AmbiguousId) as e:
        return _fail(e)
    except sqlite3.Error as e:
        return _fail(f"database error: {e}")


def _fail(e: object) -> int:
    print(f"provider-router: {e}", file=sys.stderr)
    return 1


# == session edits while a daemon serves the database ====================================
class Admin:
    """The daemon serving the database, asked through its admin API. It keeps the active
    sessions in memory and writes each back on its next request, so a session deleted or
    expired in the file behind it would come back: while it runs, it makes the change."""

    def __init__(self, pid: int | None, url: str, key: str) -> None:
        self.pid, self.url, self.key = pid, url, key

    @classmethod
    def find(cls, args: argparse.Namespace, db: Path) -> Admin | None:
        """None when no daemon serves `db`. A daemon there but no key to ask it with is an
        error: the file is left alone rather than edited behind it."""
        who = serving(db)
        if who is None:
            return None
        pid, url = who["pid"], who["url"]
        daemon = f"a running daemon (pid {pid or '?'}, {url or 'address unknown'})"
        key = _admin_key(args)
        if not key:
            raise CliError(
                f"{daemon} serves {db} and keeps its sessions in memory, so it would write this change "
                "back; stop it, or set auth.admin_key (in --config) so this command can ask it"
            )
        if who["uid"] != os.getuid():  # the key goes only where our own daemon said it listens
            raise CliError(
                f"{daemon} may serve {db}: its mark {mark_path(db)} belongs to another user, "
                "so this command neither edits the file nor sends that address the admin key"
            )
        if not url:  # held, but the daemon is starting and does not listen yet
            raise CliError(f"{daemon} serves {db} but does not listen yet; try again")
        return cls(pid, url, key)

    async def call(self, method: str, path: str) -> tuple[int, dict[str, Any]]:
        """(status, JSON body) of the admin API; 404 is the caller's, other failures raise."""
        import aiohttp  # only here: the read-only commands start faster without it

        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
                headers = {"Authorization": f"Bearer {self.key}"}
                async with http.request(method, self.url + path, headers=headers) as r:
                    status, raw = r.status, await r.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise CliError(
                f"the daemon serving this database (pid {self.pid or '?'}) did not answer at {self.url}: "
                f"{'no answer within 5 s' if isinstance(e, TimeoutError) else e}"
            ) from None
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = {}
        body = body if isinstance(body, dict) else {}
        error = body.get("error") if isinstance(body.get("error"), dict) else {}
        if status == 404 and error.get("code") == "unknown_url":
            raise CliError(f"the daemon at {self.url} has no admin API: its config sets no auth.admin_key")
        if status == 401:
            raise CliError(f"the daemon at {self.url} refused the admin key of --config (401): is that its config?")
        if status != 200 and status != 404:
            raise CliError(f"the daemon at {self.url} refused: {status} {error.get('message', '')}".rstrip())
        return status, body

    @property
    def via(self) -> str:
        return f"through the running daemon (pid {self.pid or '?'})"


def _admin_key(args: argparse.Namespace) -> str:
    """auth.admin_key of --config (./config.yaml); none if that config does not load."""
    from .config import ConfigError

    try:
        return str(_load_config(args).auth.admin_key)
    except ConfigError:
        return ""


def _edit_sessions(
    args: argparse.Namespace,
    offline: Callable[[aiosqlite.Connection], Awaitable[int]],
    online: Callable[[aiosqlite.Connection, Admin], Awaitable[int]],
) -> int:
    """`offline` edits the file when no daemon serves it; else `online` asks the daemon,
    reading the file only."""
    try:
        admin = Admin.find(args, resolve_db(args))
    except CliError as e:
        return _fail(e)
    if admin is None:
        return _run(args, offline, write=True)
    return _run(args, lambda conn: online(conn, admin))


# == rendering helpers ==================================================================
def _json_line(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def _json_doc(obj: Any) -> str:
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode()


def _parse_ts(ts: str | None) -> datetime | None:
    if not ts:
        return None
    try:
        return datetime.fromisoformat(ts).astimezone()
    except ValueError:
        return None


def local_time(ts: str | None, *, today: datetime | None = None) -> str:
    """`HH:MM:SS` local time if `ts` is today, else `YYYY-MM-DD HH:MM:SS`; `-` when unset."""
    when = _parse_ts(ts)
    if when is None:
        return ts or "-"
    today = today or datetime.now().astimezone()
    return when.strftime("%H:%M:%S" if when.date() == today.date() else "%Y-%m-%d %H:%M:%S")


def full_time(ts: str | None) -> str:
    """Local date and time with milliseconds, and the stored UTC value."""
    when = _parse_ts(ts)
    if when is None:
        return ts or "-"
    local = when.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    zone = when.strftime("%Z")
    return f"{local} {zone} ({ts})" if zone else f"{local} ({ts})"


def first_line(text: str | None) -> str:
    """The first non-blank line, with tabs and control characters made spaces."""
    if not text:
        return ""
    for line in text.splitlines():
        if line.strip():
            return "".join(c if c.isprintable() else " " for c in line.strip())
    return ""


def fit(text: str, width: int) -> str:
    """`text` cut to `width` characters, marking the cut with an ellipsis."""
    if width <= 0:
        return ""
    return text if len(text) <= width else text[: width - 1] + "…"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"  # sub-10 ms (local) still tells apart


def _tokens(row: dict[str, Any]) -> str:
    p, c = row.get("prompt_tokens"), row.get("completion_tokens")
    if p is None and c is None:
        return "-" if row.get("total_tokens") is None else str(row["total_tokens"])
    return f"{p if p is not None else '?'}/{c if c is not None else '?'}"


def _status(row: dict[str, Any]) -> str:
    status = "-" if row.get("status") is None else str(row["status"])
    outcome = row.get("outcome")
    return status if outcome in (None, "ok") else f"{status} {outcome}"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[int] = ()) -> list[str]:
    """Plain aligned columns (two spaces apart); column indexes in `right` align right."""
    rows = [list(r) for r in rows]
    right = set(right)
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    return [line(headers)] + [line(r) for r in rows]


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def content_text(content: Any) -> str:
    """A message's content as text: strings as-is, parts joined, images as `[image]`."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict):
                parts.append(str(part))
            elif part.get("type") == "text" or "text" in part:
                parts.append(str(part.get("text", "")))
            else:
                parts.append(f"[{part.get('type', 'part')}]")
        return "\n".join(parts)
    return orjson.dumps(content).decode()


def transcript_lines(role: str, text: str, width: int = 11) -> list[str]:
    """`role: text`, continuation lines indented under the text."""
    lines = text.splitlines() or [""]
    head = f"{role:>{width - 2}}: "
    return [head + lines[0]] + [" " * width + line for line in lines[1:]]


def tool_call_line(call: Any) -> str:
    """`-> name(arguments) [call id]`: what an agent asked a tool to do."""
    fn = call.get("function") if isinstance(call, dict) else None
    fn = fn if isinstance(fn, dict) else {}
    line = f"-> {fn.get('name', '?')}({fn.get('arguments', '')})"
    return line + (f" [{call['id']}]" if isinstance(call, dict) and call.get("id") else "")


def message_lines(msg: Any) -> list[str]:
    """One message as transcript lines: its text, then its tool calls; a tool result's role
    names the call it answers, so calls and results can be matched by eye."""
    if not isinstance(msg, dict):
        return transcript_lines("?", str(msg))
    role = str(msg.get("role", "?"))
    if msg.get("name"):
        role += f" ({msg['name']})"
    if msg.get("tool_call_id"):
        role += f" [{msg['tool_call_id']}]"
    text = content_text(msg.get("content"))
    for call in msg.get("tool_calls") or []:
        text += ("\n" if text else "") + tool_call_line(call)
    fc = msg.get("function_call")  # the deprecated single-call form
    if isinstance(fc, dict):
        text += ("\n" if text else "") + tool_call_line({"function": fc})
    return transcript_lines(role, text)


def message_transcript(messages: Any) -> list[str]:
    """The request's messages, one speaker per block, tool calls spelled out."""
    if not isinstance(messages, list):
        return ["  (no messages)"]
    return [line for msg in messages for line in message_lines(msg)]


def _section(title: str) -> str:
    return f"\n-- {title} " + "-" * max(0, 60 - len(title))


def _fields(pairs: Iterable[tuple[str, Any]]) -> list[str]:
    pairs = list(pairs)
    width = max(len(k) for k, _ in pairs)
    return [f"{k:<{width}}  {'-' if v is None or v == '' else v}" for k, v in pairs]


# == logs ===============================================================================
class LogTable:
    """The `logs` table: fixed columns sized from the first rows, prompt and reply sharing
    whatever the terminal has left, so `--follow` lines stay aligned with the header.
    """

    HEADERS = ("TIME", "ID", "MODEL", "PROVIDER", "STATUS", "TTFB", "DUR", "TOKENS", "PROMPT", "REPLY")
    CAPS = (19, 16, 24, 16, 24, 8, 8, 11)  # the fixed columns' widest
    RIGHT = {5, 6, 7}
    ID_WIDTH = 16  # ms + sequence: unique within a daemon; `logs show` takes any prefix
    OPTIONAL = (3, 5, 7)  # provider, ttfb, tokens: dropped in this order on narrow terminals
    SHRINK = ((2, 10), (4, 6), (2, 6))  # then model and status narrow to these widths
    MIN_TEXT = 16
    # Piped output has no terminal: be generous rather than cut at the 80-column fallback.
    PIPE_WIDTH = 160

    def __init__(self, rows: list[dict[str, Any]], width: int | None = None) -> None:
        self.today = datetime.now().astimezone()
        self.total = width or shutil.get_terminal_size((self.PIPE_WIDTH, 24)).columns
        cells = [self.fixed(r) for r in rows]
        self.widths = [
            min(cap, max([len(h)] + [len(c[i]) for c in cells]))
            for i, (h, cap) in enumerate(zip(self.HEADERS, self.CAPS))
        ]
        if not rows:  # --follow on an empty result: leave room for typical values
            self.widths = [max(w, d) for w, d in zip(self.widths, (8, 16, 12, 8, 6, 4, 4, 7))]
        self.shown = list(range(len(self.widths)))
        for i in self.OPTIONAL:
            if self._room() >= 2 * self.MIN_TEXT:
                break
            self.shown.remove(i)
        for i, floor in self.SHRINK:
            if self._room() >= 2 * self.MIN_TEXT:
                break
            self.widths[i] = min(self.widths[i], floor)
        # The prompt takes what its longest first line needs (up to half), the reply the rest.
        room = self._room()
        longest = max([len(first_line(r.get("prompt_text"))) for r in rows] or [room])
        self.prompt_width = max(min(room // 2, max(longest, self.MIN_TEXT)), 8)
        self.reply_width = max(room - self.prompt_width, 8)

    def _room(self) -> int:
        """Columns left for prompt and reply, after the shown fixed ones and the gaps."""
        return self.total - sum(self.widths[i] for i in self.shown) - 2 * (len(self.shown) + 1)

    def fixed(self, r: dict[str, Any]) -> list[str]:
        return [
            local_time(r.get("received_at"), today=self.today),
            (r.get("id") or "")[: self.ID_WIDTH],
            r.get("model") or "-",
            r.get("provider") or "-",
            _status(r),
            _ms(r.get("ttfb_ms")),
            _ms(r.get("duration_ms")),
            _tokens(r),
        ]

    def _line(self, cells: Sequence[str]) -> str:
        out = []
        for i in [*self.shown, len(self.widths), len(self.widths) + 1]:
            w = self.widths[i] if i < len(self.widths) else (self.prompt_width, self.reply_width)[i - len(self.widths)]
            cell = fit(cells[i], w)
            out.append(cell.rjust(w) if i in self.RIGHT else cell.ljust(w))
        # A terminal too narrow even for the shrunk columns: cut rather than wrap.
        return fit("  ".join(out).rstrip(), self.total)

    def header(self) -> str:
        return self._line(self.HEADERS)

    def line(self, r: dict[str, Any]) -> str:
        reply = first_line(r.get("response_text"))
        if not reply and r.get("error"):
            reply = "! " + first_line(r["error"])
        cells = self.fixed(r)
        if len(cells[0]) > self.widths[0]:  # --follow past midnight: keep the time, drop the date
            cells[0] = cells[0][-8:]
        if len(cells[4]) > self.widths[4]:  # a narrow status column keeps the code, not "404 re…"
            cells[4] = cells[4].split()[0]
        return self._line(cells + [first_line(r.get("prompt_text")), reply])


def _filter(args: argparse.Namespace) -> q.RequestFilter:
    return q.RequestFilter(
        session=args.session, model=args.model, provider=args.provider, client=args.client,
        status=args.status, outcome=args.outcome, query=args.query, since=args.since,
    )


# Columns of a request row that hold the tree's internals (node ids, parameters and
# response without the reply messages): `logs show ID` rebuilds the bodies from them.
INTERNAL_COLUMNS = ("params", "params_blobs", "overrides", "body_blob", "response", "replies")


def public_row(row: dict[str, Any]) -> dict[str, Any]:
    """A listed request row as `--json` prints it: every column but the internal ones."""
    for col in INTERNAL_COLUMNS:
        row.pop(col, None)
    return row


def cmd_logs(args: argparse.Namespace) -> int:
    async def body(conn: aiosqlite.Connection) -> int:
        flt = _filter(args)
        page = await q.recent_requests(conn, flt, args.limit)
        out = sys.stdout
        tbl = None if args.json else LogTable(page.rows)
        if tbl is not None and (page.rows or args.follow):
            print(tbl.header(), file=out)
        for row in page.rows:
            print(_json_line(public_row(row)) if tbl is None else tbl.line(row), file=out)
        if not args.follow:
            if not page.rows and tbl is not None:
                print("no matching requests", file=sys.stderr)
            return 0
        out.flush()
        last = page.last_rowid
        while True:
            await asyncio.sleep(FOLLOW_INTERVAL)
            page = await q.new_requests(conn, flt, last)
            last = page.last_rowid
            for row in page.rows:
                print(_json_line(public_row(row)) if tbl is None else tbl.line(row), file=out, flush=True)

    try:
        return _run(args, body)
    except KeyboardInterrupt:
        if args.follow:  # the way out of --follow: quiet, and not a failure
            return 0
        raise


def _usage(r: dict[str, Any]) -> str | None:
    keys = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens")
    if all(r.get(k) is None for k in keys):
        return None
    out = (
        f"prompt {_or_dash(r.get('prompt_tokens'))}, completion {_or_dash(r.get('completion_tokens'))}, "
        f"total {_or_dash(r.get('total_tokens'))}"
    )
    if r.get("cached_tokens") is not None:
        out += f", cached {r['cached_tokens']}"
    return out


def _or_dash(value: Any) -> str:
    return "-" if value is None else str(value)


def reply_transcript(choice: dict[str, Any]) -> list[str]:
    """One choice of the response: reasoning, text, refusal, tool calls, finish reason."""
    msg = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    out: list[str] = []
    reasoning = msg.get("reasoning_content") or msg.get("reasoning")
    if reasoning:
        out += transcript_lines("reasoning", str(reasoning))
    out += message_lines({**msg, "role": msg.get("role") or "assistant"})
    if msg.get("refusal"):
        out += transcript_lines("refusal", str(msg["refusal"]))
    out += transcript_lines("finish", str(choice.get("finish_reason") or "-"))
    return out


def render_request(r: dict[str, Any]) -> list[str]:
    """One request in full: fields, the request as a transcript (tool calls and results
    included), each choice's reply, usage, what was cut, upstream attempts."""
    request, response = r.get("request"), r.get("response")
    stream = {None: None, 0: "no", 1: "yes"}.get(r.get("stream"), r.get("stream"))
    if stream == "yes" and r.get("chunk_count") is not None:
        stream += f" ({r['chunk_count']} chunks)"
    lineage = None
    if r.get("parent_id") or r.get("reply_id"):
        lineage = f"{r.get('parent_id') or '(new chat)'} -> {r.get('reply_id') or '-'}"
    out = [f"request {r['id']}"]
    out += _fields([
        ("received", full_time(r.get("received_at"))),
        ("finished", full_time(r.get("finished_at"))),
        ("method", f"{r.get('method')} {r.get('path')}"),
        ("client", r.get("client")),
        ("user agent", r.get("user_agent")),
        ("model", r.get("model")),
        ("provider", r.get("provider")),
        ("upstream model", r.get("upstream_model")),
        ("stream", stream),
        ("status", _status(r)),
        ("finish reason", r.get("finish_reason")),
        ("ttfb", None if r.get("ttfb_ms") is None else f"{r['ttfb_ms']:.1f} ms"),
        ("duration", None if r.get("duration_ms") is None else f"{r['duration_ms']:.1f} ms"),
        ("usage", _usage(r)),
        ("session", r.get("session_id")),
        ("turn", r.get("turn")),
        ("chat_id", r.get("chat_id")),
        ("parent -> reply", lineage),
        # Only when something was: what, and the text itself marks where it was cut.
        *([("stored cut", r["cut"])] if r.get("cut") else []),
    ])
    if r.get("error"):
        out += [_section("error"), str(r["error"])]
    if isinstance(request, dict):
        params = {k: v for k, v in request.items() if k != "messages"}
        out += [_section("request"), *message_transcript(request.get("messages"))]
        if params:
            out.append("params: " + _json_line(params))
    elif request is not None:
        out += [_section("request body (not a chat request)"), request if isinstance(request, str) else _json_doc(request)]
    choices = response.get("choices") if isinstance(response, dict) else None
    if isinstance(choices, list) and choices:
        for i, choice in enumerate(choices):
            title = "reply" if len(choices) == 1 else f"reply {i + 1} of {len(choices)}"
            out += [_section(title), *reply_transcript(choice if isinstance(choice, dict) else {})]
    elif response is not None:
        out += [_section("response body"), response if isinstance(response, str) else _json_doc(response)]
    if r.get("attempts"):
        out += [_section("upstream attempts")]
        out += [_json_line(a) for a in r["attempts"]] if isinstance(r["attempts"], list) else [str(r["attempts"])]
    return out


def cmd_logs_show(args: argparse.Namespace) -> int:
    async def body(conn: aiosqlite.Connection) -> int:
        row = await q.get_request(conn, args.id)
        if row is None:
            raise CliError(f"no request with id {args.id!r}")
        print(_json_doc(row) if getattr(args, "json", False) else "\n".join(render_request(row)))
        return 0

    return _run(args, body)


# == sessions ===========================================================================
def cmd_sessions_list(args: argparse.Namespace) -> int:
    async def body(conn: aiosqlite.Connection) -> int:
        rows = await q.list_sessions(conn, active_only=args.active, limit=args.limit)
        if args.json:
            for row in rows:
                print(_json_line(row))
            return 0
        if not rows:
            print("no sessions" + (" active" if args.active else ""), file=sys.stderr)
            return 0
        today = datetime.now().astimezone()
        cells = [
            [
                r["id"], r["state"], r["client"], f"{r['provider']}/{r['upstream_model']}",
                str(r["request_count"]), str(r["message_count"]),
                local_time(r["created_at"], today=today), local_time(r["last_accessed_at"], today=today),
                local_time(r["expires_at"], today=today),
            ]
            for r in rows
        ]
        headers = ("ID", "STATE", "CLIENT", "PROVIDER/MODEL", "TURNS", "MSGS", "CREATED", "LAST ACCESS", "EXPIRES")
        print("\n".join(table(headers, cells, right={4, 5})))
        return 0

    return _run(args, body)


def render_session(s: dict[str, Any], requests: list[dict[str, Any]]) -> list[str]:
    """The session's fields, then each of its requests as a turn of the conversation."""
    meta = s.get("metadata")
    out = [f"session {s['id']}"]
    out += _fields([
        ("state", s.get("state")),
        ("client", s.get("client")),
        ("route", f"{s.get('provider')}/{s.get('upstream_model')}"),
        ("chat_id", s.get("chat_id")),
        ("tip (parent_id)", s.get("parent_id")),
        ("created", full_time(s.get("created_at"))),
        ("last access", full_time(s.get("last_accessed_at"))),
        ("expires", full_time(s.get("expires_at"))),
        ("requests", s.get("request_count")),
        ("messages", s.get("message_count")),
        ("thread turns", s.get("turn_rows")),
        ("fingerprint", s.get("fingerprint")),
        ("metadata", None if meta is None else (meta if isinstance(meta, str) else _json_line(meta))),
    ])
    out.append(_section(f"conversation ({len(requests)} requests)"))
    if not requests:
        out.append("(no request rows: they may have been pruned)")
    for r in requests:
        turn = "?" if r.get("turn") is None else r["turn"]
        lineage = f"{r.get('parent_id') or '(new chat)'} -> {r.get('reply_id') or '-'}"
        out.append("")
        out.append(
            f"turn {turn}  {r['id']}  {local_time(r.get('received_at'))}  {_status(r)}"
            f"  chat {r.get('chat_id') or '-'}  {lineage}"
        )
        out += transcript_lines("user", r.get("prompt_text") or "")
        reply = r.get("response_text")
        if reply is None and r.get("error"):
            out += transcript_lines("error", str(r["error"]))
        else:
            out += transcript_lines("assistant", reply or "")
    return out


async def _session(conn: aiosqlite.Connection, prefix: str) -> dict[str, Any]:
    s = await q.get_session(conn, prefix)
    if s is None:
        raise CliError(f"no session with id {prefix!r}")
    return s


def _short(value: str | None, n: int = 8) -> str:
    return "-" if not value else (value if len(value) <= n else value[:n] + "…")


def node_text(message: Any) -> str:
    """What a tree line shows of a message: its text, else its tool calls, else its refusal."""
    if not isinstance(message, dict):
        return str(message)
    text = first_line(content_text(message.get("content")))
    if not text:
        calls = message.get("tool_calls") or []
        text = " ".join(tool_call_line(c) for c in calls) if isinstance(calls, list) else ""
    if not text and isinstance(message.get("function_call"), dict):
        text = tool_call_line({"function": message["function_call"]})
    if not text and message.get("refusal"):
        text = f"(refused) {message['refusal']}"
    return first_line(text)


def node_label(node: tv.Node) -> str:
    """`role: text`; a tool result names the call it answers."""
    m = node.message if isinstance(node.message, dict) else {}
    role = node.role
    if m.get("tool_call_id"):
        role += f" [{m['tool_call_id']}]"
    return f"{role}: {node_text(node.message)}"


def node_note(node: tv.Node, tip_reply: str | None) -> str:
    """The right-hand note of a tree line: which requests produced this reply (turn, short
    id), requests that ended here without one (an error), and where the upstream thread
    continues from it."""
    notes: list[str] = []
    for i, r in enumerate(node.produced_by):
        if i == 2:  # a reply produced again and again (a deterministic regenerate): count
            notes.append(f"[+{len(node.produced_by) - 2} more]")
            break
        notes.append(f"[turn {_or_dash(r.turn)} {r.id[:LogTable.ID_WIDTH]}]")
    for r in node.tip_of:
        if not r.replies:
            status = _status({"status": r.status, "outcome": r.outcome})
            notes.append(f"[turn {_or_dash(r.turn)} {r.id[:LogTable.ID_WIDTH]} {status}]")
    for t in node.threads:
        tip = ", session tip" if tip_reply and t.reply_id == tip_reply else ""
        notes.append(f"[⇢ chat {_short(t.chat_id)} reply {_short(t.reply_id)}{tip}]")
    return "  ".join(notes)


def render_tree(tree: tv.SessionTree, width: int, tip_reply: str | None = None) -> list[str]:
    """The tree, one node a line. A node with one child continues on the next line at the
    same depth, so a long linear conversation stays at the margin; where a node has more
    children (a regenerate, an edit, a go-back) each starts a sibling branch under `├─` /
    `└─`, and the guide `│` runs down beside the earlier ones until the last starts. The
    branch that goes on longest is drawn last, so the short side branches close early and
    the `│` guides stay short however long the conversation goes on after them."""
    out: list[str] = []
    # A child's id is above its parent's (it is stored after it): one pass from the highest
    # id gives every node its height without recursion.
    height: dict[int, int] = {}
    for nid in sorted(tree.nodes, reverse=True):
        height[nid] = 1 + max((height.get(c, 0) for c in tree.nodes[nid].children), default=0)
    # (node id, the guide prefix of its line, its connector): an explicit stack, since a
    # conversation of hundreds of turns is deeper than Python's recursion limit.
    stack: list[tuple[int, str, str]] = []
    roots = tree.roots
    for i, root in reversed(list(enumerate(roots))):
        if len(roots) == 1:
            stack.append((root, "", ""))
        else:
            last = i == len(roots) - 1
            stack.append((root, "   " if last else "│  ", "└─ " if last else "├─ "))
    while stack:
        nid, guide, connector = stack.pop()
        node = tree.nodes[nid]
        head = (guide[:-3] + connector) if connector else guide
        label, note = node_label(node), node_note(node, tip_reply)
        room = width - len(head) - (len(note) + 2 if note else 0)
        text = fit(label, max(room, 16))
        out.append(fit(f"{head}{text}  {note}" if note else f"{head}{text}", width))
        kids = sorted(node.children, key=lambda c: (height[c], c))
        if len(kids) == 1:
            stack.append((kids[0], guide, ""))
            continue
        for j in reversed(range(len(kids))):
            last = j == len(kids) - 1
            stack.append((kids[j], guide + ("   " if last else "│  "), "└─ " if last else "├─ "))
    return out


def cmd_sessions_show(args: argparse.Namespace) -> int:
    async def body(conn: aiosqlite.Connection) -> int:
        s = await _session(conn, args.id)
        if getattr(args, "tree", False):
            tree = await tv.session_tree(conn, s["id"])
            width = shutil.get_terminal_size((LogTable.PIPE_WIDTH, 24)).columns
            branches = tree.branch_points()
            print(
                f"session {s['id']}  {s.get('provider')}/{s.get('upstream_model')}  {s.get('state')}  "
                f"{len(tree.requests)} request(s), {len(tree.nodes)} message(s), "
                f"{branches} branch point(s)"
            )
            if not tree.nodes:
                print("(no messages: the session's requests may have been pruned)")
            print("\n".join(render_tree(tree, width, s.get("parent_id"))))
            return 0
        requests = [public_row(r) for r in await q.session_requests(conn, s["id"])]
        if args.json:
            print(_json_doc({"session": s, "requests": requests}))
        else:
            print("\n".join(render_session(s, requests)))
        return 0

    return _run(args, body)


def cmd_sessions_delete(args: argparse.Namespace) -> int:
    async def offline(conn: aiosqlite.Connection) -> int:
        s = await _session(conn, args.id)
        gone = await q.delete_session(conn, s["id"])
        if gone is None:  # the daemon deleted it between the lookup and the delete
            raise CliError(f"no session with id {args.id!r}")
        print(
            f"deleted session {gone.id} ({s['provider']}/{s['upstream_model']}, {s['state']}) "
            f"and its {gone.turns} thread turn(s); its {gone.requests_kept} request row(s) are kept"
        )
        return 0

    async def online(conn: aiosqlite.Connection, admin: Admin) -> int:
        s = await _session(conn, args.id)
        kept = await q.count_session_requests(conn, s["id"])
        status, _ = await admin.call("DELETE", f"/admin/sessions/{s['id']}")
        if status == 404:  # gone between the lookup and the call
            raise CliError(f"no session with id {args.id!r}")
        print(
            f"deleted session {s['id']} ({s['provider']}/{s['upstream_model']}, {s['state']}) "
            f"and its thread turns {admin.via}; its {kept} request row(s) are kept"
        )
        return 0

    return _edit_sessions(args, offline, online)


def cmd_sessions_cleanup(args: argparse.Namespace) -> int:
    async def offline(conn: aiosqlite.Connection) -> int:
        n = await q.expire_sessions(conn)
        print(f"marked {n} session(s) expired")
        return 0

    async def online(_: aiosqlite.Connection, admin: Admin) -> int:
        _, body = await admin.call("POST", "/admin/sessions/cleanup")
        print(f"marked {body.get('expired', 0)} session(s) expired {admin.via}")
        return 0

    return _edit_sessions(args, offline, online)


# == stats ==============================================================================
def cmd_stats(args: argparse.Namespace) -> int:
    async def body(conn: aiosqlite.Connection) -> int:
        st = await q.stats(conn, args.since)
        if args.json:
            print(_json_doc(st.as_dict()))
            return 0
        headers = ("MODEL", "PROVIDER", "REQS", "ERRORS", "TOK IN", "TOK OUT", "CACHED",
                   "TTFB p50", "TTFB p95", "DUR p50", "DUR p95")

        def cells(g: q.GroupStats, model: str, provider: str) -> list[str]:
            return [
                model, provider, str(g.requests), str(g.errors), str(g.prompt_tokens), str(g.completion_tokens),
                str(g.cached_tokens), _ms(g.ttfb_p50_ms), _ms(g.ttfb_p95_ms), _ms(g.duration_p50_ms), _ms(g.duration_p95_ms),
            ]

        rows = [cells(g, g.model or "-", g.provider or "-") for g in st.groups]
        rows.append(cells(st.total, "TOTAL", ""))
        if args.since:
            print(f"since {full_time(args.since)}")
        print("\n".join(table(headers, rows, right=range(2, 11))))
        s = st.sessions
        print(f"\nsessions: {s['active']} active, {s['expired']} expired, {s['total']} total")
        # The roll-ups keep latencies as histogram buckets, so percentiles are estimates.
        print("latencies in ms; percentiles estimated from histogram buckets (--json has means too)")
        return 0

    return _run(args, body)


# == db =================================================================================
def cmd_db_path(args: argparse.Namespace) -> int:
    print(resolve_db(args).resolve())
    return 0


def _db_size(path: Path) -> tuple[int, int]:
    wal = Path(f"{path}-wal")
    return path.stat().st_size, (wal.stat().st_size if wal.exists() else 0)


def cmd_db_prune(args: argparse.Namespace) -> int:
    def progress(kind: str, n: int) -> None:
        print(f"  deleted {n} {kind} so far", file=sys.stderr, flush=True)

    async def body(conn: aiosqlite.Connection) -> int:
        res = await q.prune(conn, args.older_than, batch=args.batch, progress=progress)
        print(
            f"deleted {res.requests} request(s) received before {res.cutoff} and "
            f"{res.sessions} expired session(s) last used before it"
        )
        # Messages and blobs are shared by requests: only those no kept row uses went.
        print(f"and {res.messages} message(s) and {res.blobs} stored request field(s) nothing else used")
        if res.requests or res.sessions:
            print("(the file keeps its size until `provider-router db vacuum`)", file=sys.stderr)
        return 0

    return _run(args, body, write=True)


def cmd_db_vacuum(args: argparse.Namespace) -> int:
    path = resolve_db(args)

    async def body(conn: aiosqlite.Connection) -> int:
        before = _db_size(path)
        busy, _, _ = await q.vacuum(conn)
        after = _db_size(path)
        print(f"before: {_human_size(sum(before))} (db {_human_size(before[0])}, wal {_human_size(before[1])})")
        print(f"after:  {_human_size(sum(after))} (db {_human_size(after[0])}, wal {_human_size(after[1])})")
        if busy:
            print("note: a reader kept the WAL busy; it is truncated at the next checkpoint", file=sys.stderr)
        return 0

    return _run(args, body, write=True)


# == argument parsing ===================================================================
def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return n


def _positive(text: str) -> int:
    n = _count(text)
    if n == 0:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return n


def _when(text: str) -> str:
    try:
        return q.cutoff(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _leaf(sub: Any, name: str, add_common: AddCommon, *, help: str, description: str, epilog: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help=help, description=description, epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common(p)
    return p


def _keep_parent_values(parser: argparse.ArgumentParser) -> None:
    # argparse copies a subcommand's namespace over its parent's, defaults included, so
    # `logs --db X show ID` would lose X. Options the subcommand was not given stay unset.
    for action in parser._actions:
        if action.dest != "help":
            if action.help and "%(default)s" in action.help:  # keep the help text readable
                action.help = action.help.replace("%(default)s", str(action.default))
            action.default = argparse.SUPPRESS


SINCE_HELP = "only requests received since then: 30m, 1h, 2d, 1w ago, or an ISO date/time (local unless it has a zone)"


def _register_logs(sub: Any, add_common: AddCommon) -> None:
    logs = _leaf(
        sub, "logs", add_common,
        help="list logged requests (newest N, oldest first)",
        description="List logged requests: the newest N matching ones, printed oldest first, one "
        "line each (time, id, model, provider, status, ttfb, duration, tokens in/out, first line "
        "of the prompt and of the reply), cut to the terminal's width; narrow terminals drop the "
        "provider, ttfb and token columns first. Times are local; durations in ms. Works while "
        "the daemon runs: it only reads.",
        epilog="examples:\n"
        "  provider-router logs -n 50 --model 'gpt-*'\n"
        "  provider-router logs -q 'database migration' --since 2d\n"
        "  provider-router logs --outcome upstream_error --json | jq .error\n"
        "  provider-router logs --client alice --since 1d\n"
        "  provider-router logs --follow\n"
        "  provider-router logs show 0193f2a1b2c3     (one request in full)",
    )
    logs.add_argument("-n", "--limit", type=_count, default=20, metavar="N", help="how many (default: 20; 0 = all)")
    logs.add_argument("--session", metavar="ID", help="only requests of this session (id or prefix)")
    logs.add_argument("-m", "--model", metavar="M", help="only this requested model; globs work: 'gpt-*'")
    logs.add_argument("--provider", metavar="P", help="only requests routed to this provider")
    logs.add_argument(
        "--client", metavar="NAME",
        help="only requests of this client key (its name in auth.client_keys; the key itself is never logged)",
    )
    logs.add_argument("--status", type=int, metavar="CODE", help="only this HTTP status, e.g. 404")
    logs.add_argument(
        "--outcome", metavar="O",
        help="only this outcome: ok, rejected, upstream_error, timeout, client_disconnected",
    )
    logs.add_argument(
        "-q", "--query", metavar="TEXT",
        help="full-text search in prompts and replies; every word must occur (word* for a prefix)",
    )
    logs.add_argument("--since", type=_when, metavar="WHEN", help=SINCE_HELP)
    logs.add_argument(
        "--json", action="store_true",
        help="one JSON object per line: every column, with the text of the prompt, reply and "
        "reasoning (the full bodies: `logs show ID --json`)",
    )
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new requests as they are logged, until Ctrl-C")
    logs.set_defaults(func=cmd_logs)

    logs_sub = logs.add_subparsers(dest="logs_command", title="subcommand", metavar="[show ID]")
    show = _leaf(
        logs_sub, "show", add_common,
        help="one request in full",
        description="Show one request in full: every field, the request's messages as a transcript "
        "(tool calls as `-> name(arguments) [call id]`, tool results under `tool [call id]`), then "
        "each choice's reply, streamed or not (reasoning, text, tool calls, finish reason), usage "
        "with cached tokens, session lineage, what was stored cut, upstream attempts and error.",
        epilog="examples:\n  provider-router logs show 0193f2a1b2c3\n  provider-router logs show 0193f2a1b2c3 --json",
    )
    show.add_argument("id", metavar="ID", help="the request id, or a unique prefix of it")
    show.add_argument(
        "--json", action="store_true",
        help="one JSON document: the row's columns, `request` (the body as received; key order may "
        "differ) and `response` (as sent, or for a stream the assembled chat.completion with usage)",
    )
    _keep_parent_values(show)
    show.set_defaults(func=cmd_logs_show)


def _register_sessions(sub: Any, add_common: AddCommon) -> None:
    sessions = sub.add_parser(
        "sessions", help="list, show, delete or expire conversation sessions",
        description="Conversation sessions: a conversation's requests grouped, and on threaded "
        "upstreams the upstream chat it continues. A one-shot request to a stateless upstream "
        "has no session; a conversation gets one with its second request.",
        epilog="examples:\n  provider-router sessions list --active\n  provider-router sessions show 3f9a",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ssub = sessions.add_subparsers(dest="sessions_command", metavar="COMMAND")
    sessions.set_defaults(func=lambda args: (sessions.print_help(), 2)[1])

    ls = _leaf(
        ssub, "list", add_common, help="list sessions, most recently used last",
        description="List the most recently used sessions: id, state, client, provider/model, "
        "requests (turns), messages, created, last access, expiry.",
        epilog="examples:\n  provider-router sessions list\n  provider-router sessions list --active -n 0 --json",
    )
    ls.add_argument("--active", action="store_true", help="only active sessions")
    ls.add_argument("-n", "--limit", type=_count, default=20, metavar="N", help="how many (default: 20; 0 = all)")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(func=cmd_sessions_list)

    show = _leaf(
        ssub, "show", add_common, help="one session and its conversation",
        description="Show a session's fields and its conversation, request by request: turn, the "
        "user's last message, the reply, and the upstream lineage (chat_id, parent_id -> reply_id). "
        "With --tree, draw the conversation as a tree instead: where the client regenerated a "
        "reply, edited a message or went back, the branches appear side by side.",
        epilog="examples:\n  provider-router sessions show 3f9a\n  provider-router sessions show 3f9a --tree",
    )
    show.add_argument("id", metavar="ID", help="the session id, or a unique prefix of it")
    view = show.add_mutually_exclusive_group()
    view.add_argument("--json", action="store_true", help='one JSON document: {"session": ..., "requests": [...]}')
    view.add_argument(
        "--tree", action="store_true",
        help="draw the conversation tree instead: every message once, branches (regenerate, edit, "
        "go back) side by side, each reply with its turn and request id, and ⇢ where a threaded "
        "upstream continues (its chat and reply ids)",
    )
    show.set_defaults(func=cmd_sessions_show)

    delete = _leaf(
        ssub, "delete", add_common, help="delete a session (its request rows stay)",
        description="Delete a session and its thread turns. Its request rows stay in the log. "
        "The next request of that conversation starts a new upstream chat. The upstream's "
        "own copy of the chat is not deleted. While a daemon serves the database, the delete "
        "goes through its admin API (auth.admin_key of --config), since the daemon would "
        "otherwise write the session back; without that key the command refuses.",
        epilog="example:\n  provider-router sessions delete 3f9a",
    )
    delete.add_argument("id", metavar="ID", help="the session id, or a unique prefix of it")
    delete.set_defaults(func=cmd_sessions_delete)

    cleanup = _leaf(
        ssub, "cleanup", add_common, help="mark sessions past their expiry as expired",
        description="Mark active sessions whose expiry time has passed as expired (the daemon does "
        "this itself every sessions.cleanup_interval_minutes). With no daemon running it edits the "
        "file and deletes no upstream chats; while a daemon serves the database it asks the daemon "
        "through its admin API (auth.admin_key of --config), and refuses without that key.",
        epilog="example:\n  provider-router sessions cleanup",
    )
    cleanup.set_defaults(func=cmd_sessions_cleanup)


def _register_stats(sub: Any, add_common: AddCommon) -> None:
    stats = _leaf(
        sub, "stats", add_common, help="request counts, errors, tokens and latency per model",
        description="Per (model, provider): requests, errors (outcome other than ok), tokens in, "
        "out and cached, p50/p95 time to first byte and total duration; then session counts by "
        "state. Read from per-minute roll-ups written with the log, so it answers fast for any "
        "range (--since has minute resolution) and the percentiles are estimates from latency "
        "histogram buckets; --json adds the exact means.",
        epilog="examples:\n  provider-router stats\n  provider-router stats --since 1d --json",
    )
    stats.add_argument("--since", type=_when, metavar="WHEN", help=SINCE_HELP + " (sessions: used since then)")
    stats.add_argument("--json", action="store_true", help="one JSON document")
    stats.set_defaults(func=cmd_stats)


def _register_db(sub: Any, add_common: AddCommon) -> None:
    db = sub.add_parser(
        "db", help="database path, pruning and vacuuming",
        description="Maintain the log database.",
        epilog="examples:\n  provider-router db path\n  provider-router db prune --older-than 30d && provider-router db vacuum",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dsub = db.add_subparsers(dest="db_command", metavar="COMMAND")
    db.set_defaults(func=lambda args: (db.print_help(), 2)[1])

    path = _leaf(
        dsub, "path", add_common, help="print the database's path",
        description="Print the absolute path of the log database (from --db, or database.path in the config).",
        epilog="example:\n  sqlite3 \"$(provider-router db path)\"",
    )
    path.set_defaults(func=cmd_db_path)

    prune = _leaf(
        dsub, "prune", add_common, help="delete old requests and expired sessions",
        description="Delete requests received before the cutoff, and expired sessions last used "
        "before it (with their thread turns), in small batches of one transaction each so a "
        "running daemon keeps logging. Messages and stored request fields (tools, schemas) "
        "that no remaining request, session turn or later message uses go too, and the "
        "full-text index follows. Progress goes to stderr.",
        epilog="examples:\n  provider-router db prune --older-than 30d\n"
        "  provider-router db prune --older-than 2026-01-01 --batch 1000",
    )
    prune.add_argument(
        "--older-than", type=_when, required=True, metavar="AGE",
        help="the cutoff: an age (30d, 12h, 1w) or an ISO date/time",
    )
    prune.add_argument("--batch", type=_positive, default=5000, metavar="N", help="rows per transaction (default: %(default)s)")
    prune.set_defaults(func=cmd_db_prune)

    vacuum = _leaf(
        dsub, "vacuum", add_common, help="compact the database file",
        description="Rebuild the database file to return free space to the filesystem, then "
        "checkpoint and truncate the WAL; prints the size before and after. VACUUM holds the "
        "write lock while it runs: on a large database, stop the daemon first.",
        epilog="example:\n  provider-router db vacuum",
    )
    vacuum.set_defaults(func=cmd_db_vacuum)


def register(sub: Any, add_common: AddCommon) -> None:
    """Add `logs`, `sessions`, `stats` and `db` to the main parser's subcommands."""
    _register_logs(sub, add_common)
    _register_sessions(sub, add_common)
    _register_stats(sub, add_common)
    _register_db(sub, add_common)
