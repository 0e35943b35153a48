"""What the commands share: the options every command takes (--config, --db, --json),
declared once; the config they name; the error a command fails with; option value types.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import click

from .. import location
from ..config import Config, ConfigError, ModelConfig, ProviderConfig, load_config
from ..store.queries import cutoff

PROG = "provider-router"
DEFAULT_CONFIG = "config.yaml"
# With no ./config.yaml: the local `echo` model, which needs no key, and default paths.
BUILT_IN = Config(providers=(ProviderConfig(name="echo", type="echo"),), models=(ModelConfig(name="echo", provider="echo"),))
SINCE_HELP = "only requests received since then: 30m, 1h, 2d, 1w ago, or an ISO date/time (local unless it has a zone)"
UNTIL_HELP = "only requests received before then (same forms as --since): --since 2d --until 1d is yesterday's"

F = TypeVar("F", bound=Callable[..., Any])


class CliError(click.ClickException):
    """A user-facing failure: one line on stderr, exit status 1 (2 for a config error)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.exit_code = status

    def show(self, file: Any = None) -> None:
        click.echo(f"{PROG}: {self.format_message()}", file=file, err=True)


class Group(click.Group):
    """A command group that lists its commands in the order they were added (most used
    first), not alphabetically."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


@dataclass
class Settings:
    """What the shared options said, wherever they stood on the command line:
    `logs --db X show ID` and `logs show ID --db X` mean the same."""

    config: str = DEFAULT_CONFIG
    db: str | None = None
    json: bool = False

    def load(self, only: str | None = None) -> Config:
        """The --config file (./config.yaml by default), or built-in defaults if that is
        absent; with `only`, just that section of it is read (see `parse_config`)."""
        path = Path(self.config)
        if not path.exists():
            if self.config != DEFAULT_CONFIG:
                raise ConfigError(f"config file not found: {path}")
            return BUILT_IN
        return load_config(path, only=only)

    def db_path(self) -> Path:
        """--db, else database.path of the config (its other sections are not needed): for
        the commands that need a SQLite file."""
        return Path(self.db) if self.db else Path(self.load("database").database.path)

    def db_location(self) -> str:
        """--db, else database.url, else database.path: a SQLite file's path or a
        `postgresql://` URL (`location` tells them apart)."""
        return self.db or self.load("database").database.location


pass_settings = click.make_pass_decorator(Settings, ensure=True)


def _into_settings(name: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def store(ctx: click.Context, _: click.Parameter, value: Any) -> None:
        if value is not None and value is not False:  # given: a later command's value wins
            if name == "db" and (why := location.refused(value)):
                raise click.BadParameter(why)  # never quoting the value: it may carry a password
            setattr(ctx.ensure_object(Settings), name, value)

    return store


def config_options(f: F) -> F:
    """--config and --db, for a command that reads the config or the log database."""
    f = click.option(
        "--db", metavar="PATH|URL", expose_value=False, callback=_into_settings("db"),
        help="log database: a SQLite file's path or a postgresql:// URL "
        "(default: database.url, else database.path from the config)",
    )(f)
    return click.option(
        "--config", metavar="PATH", expose_value=False, callback=_into_settings("config"),
        help=f"config file (default: {DEFAULT_CONFIG})",
    )(f)


def with_settings(f: F) -> F:
    """--config and --db, and the `Settings` all shared options filled as the first argument."""
    return config_options(pass_settings(f))


def json_option(help: str) -> Callable[[F], F]:
    """--json, with what it prints in this command."""
    return click.option("--json", is_flag=True, expose_value=False, callback=_into_settings("json"), help=help)


def examples(*lines: str) -> str:
    """An epilog of example command lines, kept as written (`\\b`: click does not rewrap it)."""
    return "\b\nexamples:\n" + "\n".join(f"  {line}" for line in lines)


class When(click.ParamType):
    """An age (30m, 1h, 2d, 1w) or an ISO date/time, as the database's timestamp text."""

    name = "when"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return cutoff(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


COUNT = click.IntRange(min=0)
POSITIVE = click.IntRange(min=1)
