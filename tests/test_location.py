"""A database location: a SQLite file's path or a PostgreSQL URL, its password never shown
wherever the URL carries it, and what is neither refused before it becomes a file name."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from provider_router import location
from provider_router.cli import cli as main
from provider_router.config import parse_config

SECRET = "Pr0xy-s3cret"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"postgresql://proxy:{SECRET}@db:5432/log", "postgresql://proxy:***@db:5432/log"),
        (f"postgres://proxy@db/log?sslmode=require&password={SECRET}", "postgres://proxy@db/log?sslmode=require&password=***"),
        ("postgresql://proxy:p@ss:w/rd@db/log", "postgresql://proxy:***@db/log"),  # unencoded @ : / in the password
        ("postgresql://proxy@db/log", "postgresql://proxy@db/log"),
        ("data/provider-router.db", "data/provider-router.db"),
    ],
)
def test_a_url_is_shown_without_its_password_wherever_it_carries_it(url: str, shown: str) -> None:
    assert location.shown(url) == shown
    for secret in location.secrets(url):
        assert secret not in location.shown(url)


def test_a_percent_encoded_password_is_a_secret_as_written_and_decoded() -> None:
    assert location.secrets("postgresql://u:a%2Fb%40c@db/log") == ["a%2Fb%40c", "a/b@c"]


@pytest.mark.parametrize(
    "given",
    [f"postgresql+psycopg://proxy:{SECRET}@db/log", f"mysql://proxy:{SECRET}@db/log", f"host=db password={SECRET} dbname=log"],
)
def test_a_db_that_is_neither_a_path_nor_a_postgresql_url_is_refused_without_echoing_it(
    given: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Taken for a file's path, it would become directories named after the password."""
    monkeypatch.chdir(tmp_path)
    for args in (["logs", "--db", given], ["db", "path", "--db", given], ["serve", "--db", given, "--port", "0"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert SECRET not in result.output and "postgresql://" in result.output
        assert list(tmp_path.iterdir()) == []


def test_config_reprs_mask_secrets() -> None:
    """A traceback's locals show configs, cut to a length where the redactor no longer
    recognises a secret: their reprs never carry one."""
    cfg = parse_config(
        f"database: {{url: 'postgresql://proxy:{SECRET}@db/log'}}\n"
        "providers: [{name: o, type: openai, base_url: 'https://api.example/v1', api_key: sk-live-abcdef}]\n"
        "models: [{name: '*', provider: o}]\nauth: {admin_key: admin-key-123}\n"
    )
    text = repr(cfg)
    for secret in (SECRET, "sk-live-abcdef", "admin-key-123"):
        assert secret not in text
    assert "postgresql://proxy:***@db/log" in text and SECRET in cfg.secrets()
