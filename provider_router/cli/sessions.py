"""`sessions list`, `show`, `refresh`, `delete` and `cleanup`: conversation sessions, read
from the database; edited in the file, or through the daemon while one serves it. An ID is a
session's id or a unique prefix of it (an ambiguous one fails, naming the candidates).
"""

from __future__ import annotations

import shutil
import time
from datetime import datetime
from typing import Any

import click

from ..store import session_reads
from ..store.reads import LogReads
from .admin import Admin, edit_sessions
from .common import COUNT, CliError, Group, Settings, examples, json_option, with_settings
from .database import run_location
from .output import PIPE_WIDTH, json_doc, json_line, local_time, public_row, table
from .session_view import render_session, render_tree


@click.group(
    "sessions", cls=Group,
    short_help="list, show, refresh, delete or expire conversation sessions",
    help="Conversation sessions: a conversation's requests grouped, and on threaded upstreams the "
    "upstream chat it continues. A one-shot request to a stateless upstream has no session; a "
    "conversation gets one with its second request.",
    epilog=examples("provider-router sessions list --active", "provider-router sessions show 3f9a"),
)
def sessions() -> None:
    pass


@sessions.command(
    "list",
    short_help="list sessions, most recently used last",
    help="List the most recently used sessions: id, state, client, provider/model, requests "
    "(turns), messages, created, last access, expiry.",
    epilog=examples(
        "provider-router sessions list", "provider-router sessions list --state expired --client alice",
        "provider-router sessions list --active -n 0 --json",
    ),
)
@click.option(
    "--state", type=click.Choice(session_reads.STATES), default="all", show_default=True, help="only sessions in this state"
)
@click.option("--active", is_flag=True, help="only active sessions (--state active)")
@click.option("--client", metavar="NAME", help="only the sessions of this client key's name")
@click.option("-n", "--limit", type=COUNT, default=20, metavar="N", help="how many (default: 20; 0 = all)")
@json_option("one JSON object per line")
@with_settings
def list_(settings: Settings, state: str, active: bool, client: str | None, limit: int) -> None:
    if active and state not in ("all", "active"):
        raise click.UsageError(f"--active and --state {state} contradict each other (--active is --state active)")
    state = "active" if active else state

    async def body(reads: LogReads) -> None:
        rows = await reads.list_sessions(state=state, client=client, limit=limit)
        if settings.json:
            if rows:
                click.echo("\n".join(json_line(r) for r in rows))
        elif not rows:
            which = "" if state == "all" else f" {state}"
            click.echo(f"no{which} sessions" + (f" of client {client}" if client else ""), err=True)
        else:
            click.echo("\n".join(_session_table(rows)))

    run_location(settings, body)


def _session_table(rows: list[dict[str, Any]]) -> list[str]:
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
    return table(headers, cells, right={4, 5})


async def _session(reads: LogReads, prefix: str) -> dict[str, Any]:
    s = await reads.get_session(prefix)
    if s is None:
        raise CliError(f"no session with id {prefix!r}")
    return s


@sessions.command(
    "show",
    short_help="one session and its conversation",
    help="Show a session (ID: its id, or a unique prefix of it): its fields and its conversation, "
    "request by request: turn, the user's last message, the reply, and the upstream lineage "
    "(chat_id, parent_id -> reply_id). With --tree, draw the conversation as a tree instead: where "
    "the client regenerated a reply, edited a message or went back, the branches appear side by side.",
    epilog=examples("provider-router sessions show 3f9a", "provider-router sessions show 3f9a --tree"),
)
@click.argument("session_id", metavar="ID")
@json_option('one JSON document: {"session": ..., "requests": [...]}')
@click.option(
    "--tree", is_flag=True,
    help="draw the conversation tree instead: every message once, branches (regenerate, edit, go "
    "back) side by side, each reply with its turn and request id, and ⇢ where a threaded upstream "
    "continues (its chat and reply ids)",
)
@with_settings
def show(settings: Settings, session_id: str, tree: bool) -> None:
    if tree and settings.json:
        raise click.UsageError("--json and --tree do not go together: pick one", click.get_current_context())

    async def body(reads: LogReads) -> None:
        s = await _session(reads, session_id)
        if tree:
            click.echo("\n".join(await _tree_lines(reads, s)))
            return
        requests = [public_row(r) for r in await reads.session_requests(s["id"])]
        if settings.json:
            click.echo(json_doc({"session": s, "requests": requests}))
        else:
            click.echo("\n".join(render_session(s, requests)))

    run_location(settings, body)


async def _tree_lines(reads: LogReads, s: dict[str, Any]) -> list[str]:
    tree = await reads.session_tree(s["id"])
    out = [
        f"session {s['id']}  {s.get('provider')}/{s.get('upstream_model')}  {s.get('state')}  "
        f"{tree.summary()}"
    ]
    if not tree.nodes:
        out.append("(no messages: the session's requests may have been pruned)")
    width = shutil.get_terminal_size((PIPE_WIDTH, 24)).columns
    return out + render_tree(tree, width, s.get("parent_id"))


@sessions.command(
    "refresh",
    short_help="extend a session's timeout (revives an ended one)",
    help="Extend a session's sliding timeout (ID: its id, or a unique prefix of it) by "
    "sessions.timeout_minutes from now; an expired or evicted session becomes active again. While "
    "a daemon serves the database, the refresh goes through its admin API (auth.admin_key of --config).",
    epilog=examples("provider-router sessions refresh 3f9a"),
)
@click.argument("session_id", metavar="ID")
@with_settings
def refresh(settings: Settings, session_id: str) -> None:
    async def offline(reads: LogReads) -> None:
        s = await _session(reads, session_id)
        timeout = settings.load("sessions").sessions.timeout_minutes * 60.0
        if not await reads.refresh_session(s["id"], time.time(), timeout):
            raise CliError(f"no session with id {session_id!r}")
        click.echo(f"refreshed session {s['id']}: active for {_minutes(timeout)}" + _revived(s))

    async def online(reads: LogReads, admin: Admin) -> None:
        s = await _session(reads, session_id)
        status, body = await admin.call("POST", f"/admin/sessions/{s['id']}/refresh")
        if status == 404:
            raise CliError(f"no session with id {session_id!r}")
        click.echo(f"refreshed session {s['id']}: active for {_minutes(body['expires_in_seconds'])} {admin.via}" + _revived(s))

    edit_sessions(settings, offline, online)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min"


def _revived(s: dict[str, Any]) -> str:
    return f" (revived: it was {s['state']})" if s["state"] != "active" else ""


@sessions.command(
    "delete",
    short_help="delete a session (its request rows stay)",
    help="Delete a session (ID: its id, or a unique prefix of it) and its thread turns. Its request "
    "rows stay in the log. The next request of that conversation starts a new upstream chat. Its "
    "upstream chats are deleted where the provider sets delete_chats_on_expiry: at once through a "
    "running daemon, else when the daemon next starts. While a daemon serves the database, the delete "
    "goes through its admin API (auth.admin_key of --config), since the daemon would otherwise "
    "write the session back; without that key the command refuses.",
    epilog=examples("provider-router sessions delete 3f9a"),
)
@click.argument("session_id", metavar="ID")
@with_settings
def delete(settings: Settings, session_id: str) -> None:
    async def offline(reads: LogReads) -> None:
        s = await _session(reads, session_id)
        gone = await reads.delete_session(s["id"])
        if gone is None:  # the daemon deleted it between the lookup and the delete
            raise CliError(f"no session with id {session_id!r}")
        click.echo(
            f"deleted session {gone.id} ({s['provider']}/{s['upstream_model']}, {s['state']}) "
            f"and its {gone.turns} thread turn(s); its {gone.requests_kept} request row(s) are kept"
        )

    async def online(reads: LogReads, admin: Admin) -> None:
        s = await _session(reads, session_id)
        kept = await reads.count_session_requests(s["id"])
        status, _ = await admin.call("DELETE", f"/admin/sessions/{s['id']}?by=cli")
        if status == 404:  # gone between the lookup and the call
            raise CliError(f"no session with id {session_id!r}")
        click.echo(
            f"deleted session {s['id']} ({s['provider']}/{s['upstream_model']}, {s['state']}) "
            f"and its thread turns {admin.via}; its {kept} request row(s) are kept"
        )

    edit_sessions(settings, offline, online)


@sessions.command(
    "cleanup",
    short_help="mark sessions past their expiry as expired",
    help="Mark active sessions whose expiry time has passed as expired (the daemon does this itself "
    "every sessions.cleanup_interval_minutes). With no daemon running it edits the file and deletes "
    "no upstream chats; while a daemon serves the database it asks the daemon through its admin API "
    "(auth.admin_key of --config), and refuses without that key.",
    epilog=examples("provider-router sessions cleanup"),
)
@with_settings
def cleanup(settings: Settings) -> None:
    async def offline(reads: LogReads) -> None:
        click.echo(f"marked {await reads.expire_sessions()} session(s) expired")

    async def online(_: LogReads, admin: Admin) -> None:
        _, body = await admin.call("POST", "/admin/sessions/cleanup")
        click.echo(f"marked {body.get('expired', 0)} session(s) expired {admin.via}")

    edit_sessions(settings, offline, online)
