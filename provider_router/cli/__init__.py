"""The command line: `serve` starts the daemon; `logs`, `sessions`, `stats` and `db` read
and maintain its log database. One module a command group; nothing below imports this package.

`provider-router --help` and `provider-router COMMAND --help` describe each command.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from typing import Any, Sequence

import click

from ..config import ConfigError
from ..store.queries import AmbiguousId
from .common import PROG, CliError, Group
from .db import db
from .logs import logs
from .serve import serve
from .sessions import sessions
from .stats import stats


class Root(Group):
    """The `provider-router` group: every failure ends as one line on stderr and an exit
    status (2 for bad usage or a bad config, 1 for the rest), never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as e:
            raise CliError(f"config error: {e}", status=2) from None
        except AmbiguousId as e:
            raise CliError(str(e)) from None
        except sqlite3.Error as e:
            raise CliError(f"database error: {e}") from None
        except BrokenPipeError:
            # The reader went away (`| head`): it had what it wanted. Point stdout at
            # /dev/null so that the flush at exit does not fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return None

    def main(  # type: ignore[override]
        self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
        standalone_mode: bool = True, **extra: Any,
    ) -> int:
        """Run a command line; its exit status (standalone: exit with it)."""
        try:
            rv = super().main(args, prog_name or self.name, complete_var, standalone_mode=False, **extra)
            status = rv if isinstance(rv, int) else 0  # an int only from `--help` and other exits
        except click.exceptions.NoArgsIsHelpError as e:  # a bare group: its help, on stderr
            e.show()
            status = e.exit_code
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx else PROG
            click.echo(f"{where}: {e.format_message()} (see `{where} --help`)", err=True)
            status = e.exit_code
        except click.ClickException as e:
            e.show()
            status = e.exit_code
        except click.Abort:  # Ctrl-C
            status = 130
        if standalone_mode:
            sys.exit(status)
        return status


@click.group(
    PROG, cls=Root,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    help="A local OpenAI-compatible proxy: routes chat requests to upstream providers, threads "
    "conversations on stateful upstreams, and logs every request to SQLite.",
    epilog="Point an OpenAI client at http://127.0.0.1:8080/v1 after `provider-router serve`.",
)
def cli() -> None:
    pass


for command in (serve, logs, sessions, stats, db):
    cli.add_command(command)


def main(argv: Sequence[str] | None = None) -> int:
    """`provider-router ARGS...`: the exit status."""
    return cli.main(list(argv) if argv is not None else None, standalone_mode=False)
