"""`logs`: the logged requests, newest N as a table or JSON lines, or followed as they are
logged; `logs show ID`: one request in full.
"""

from __future__ import annotations

import asyncio
from typing import Any

import click

from ..rowtext import OUTCOMES
from ..store import queries as q
from ..store.reads import LogReads
from .common import COUNT, SINCE_HELP, UNTIL_HELP, CliError, Group, Settings, When, config_options, examples, json_option, with_settings
from .database import run_location
from .log_table import LogTable
from .output import json_doc, json_line, public_row
from .transcript import render_request

FOLLOW_INTERVAL = 0.5  # seconds between polls of `logs --follow`


@click.group(
    "logs", cls=Group, invoke_without_command=True, subcommand_metavar="[show ID]",
    short_help="list logged requests (newest N, oldest first)",
    help="List logged requests: the newest N matching ones, printed oldest first, one line each "
    "(time, id, model, provider, status, ttfb, duration, tokens in/out, first line of the prompt "
    "and of the reply), cut to the terminal's width; narrow terminals drop the provider, ttfb and "
    "token columns first. Times are local; durations in ms. Works while the daemon runs: it only reads.",
    epilog=examples(
        "provider-router logs -n 50 --model 'gpt-*'",
        "provider-router logs -q 'database migration' --since 2d",
        "provider-router logs --outcome upstream_error --json | jq .error",
        "provider-router logs --client alice --since 1d",
        "provider-router logs --follow",
        "provider-router logs show 0193f2a1b2c3     (one request in full)",
    ),
)
@click.option("-n", "--limit", type=COUNT, default=20, metavar="N", help="how many (default: 20; 0 = all)")
@click.option("--session", metavar="ID", help="only requests of this session (id or prefix)")
@click.option("-m", "--model", metavar="M", help="only this requested model; globs work: 'gpt-*'")
@click.option("--provider", metavar="P", help="only requests routed to this provider")
@click.option(
    "--client", metavar="NAME",
    help="only requests of this client key (its name in auth.client_keys; the key itself is never logged)",
)
@click.option("--status", type=int, metavar="CODE", help="only this HTTP status, e.g. 404")
@click.option("--outcome", type=click.Choice(OUTCOMES), metavar="O", help=f"only this outcome: {', '.join(OUTCOMES)}")
@click.option(
    "-q", "--query", metavar="TEXT",
    help="full-text search in prompts and replies; every word must occur (word* for a prefix)",
)
@click.option("--since", type=When(), metavar="WHEN", help=SINCE_HELP)
@click.option("--until", type=When(), metavar="WHEN", help=UNTIL_HELP)
@json_option(
    "one JSON object per line: every column, with the text of the prompt, reply and reasoning "
    "(the full bodies: `logs show ID --json`)"
)
@click.option("-f", "--follow", is_flag=True, help="keep printing new requests as they are logged, until Ctrl-C")
@config_options
@click.pass_context
def logs(ctx: click.Context, limit: int, follow: bool, **filters: Any) -> None:
    if ctx.invoked_subcommand is not None:  # `logs show`: the options above only carry --db and the like
        return
    settings = ctx.ensure_object(Settings)
    table = not settings.json
    try:
        run_location(settings, lambda reads: _list(reads, q.RequestFilter(**filters), limit, table, follow))
    except KeyboardInterrupt:
        if not follow:
            raise
        # Ctrl-C is the way out of --follow: quiet, and not a failure.


async def _list(reads: LogReads, flt: q.RequestFilter, limit: int, table: bool, follow: bool) -> None:
    page = await reads.recent_requests(flt, limit)
    tbl = LogTable(page.rows) if table else None

    def line(row: dict[str, Any]) -> str:
        return json_line(public_row(row)) if tbl is None else tbl.line(row)

    head = [tbl.header()] if tbl is not None and (page.rows or follow) else []
    if head or page.rows:
        click.echo("\n".join(head + [line(r) for r in page.rows]))
    if not page.rows and tbl is not None and not follow:
        click.echo("no matching requests", err=True)
    last = page.cursor
    while follow:
        await asyncio.sleep(FOLLOW_INTERVAL)
        page = await reads.new_requests(flt, last)
        last = page.cursor
        for row in page.rows:
            click.echo(line(row))


@logs.command(
    "show",
    short_help="one request in full",
    help="Show one request in full (ID: its id, or a unique prefix of it): every field, the "
    "request's messages as a transcript (tool calls as `-> name(arguments) [call id]`, tool results "
    "under `tool [call id]`), then each choice's reply, streamed or not (reasoning, text, tool calls, "
    "finish reason), usage with cached tokens, session lineage, what was stored cut, upstream "
    "attempts and error.",
    epilog=examples("provider-router logs show 0193f2a1b2c3", "provider-router logs show 0193f2a1b2c3 --json"),
)
@click.argument("request_id", metavar="ID")
@json_option(
    "one JSON document: the row's columns, `request` (the body as received; key order may differ) "
    "and `response` (as sent, or for a stream the assembled chat.completion with usage)"
)
@with_settings
def show(settings: Settings, request_id: str) -> None:
    async def body(reads: LogReads) -> None:
        row = await reads.get_request(request_id)
        if row is None:
            raise CliError(f"no request with id {request_id!r}")
        click.echo(json_doc(row) if settings.json else "\n".join(render_request(row)))

    run_location(settings, body)
