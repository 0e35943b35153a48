"""Config: env expansion, defaults, and start-up errors that name the offending key."""

from __future__ import annotations

import pytest

from provider_router.config import ConfigError, expand_env, parse_config

PROVIDERS = "providers: [{name: echo, type: echo}]\n"
MIN = PROVIDERS + "models: [{name: echo, provider: echo}]\n"


def test_env_expansion_forms() -> None:
    """`${VAR}` substitutes, `${VAR:-d}` falls back when unset or empty, unset `${VAR}` is empty."""
    env = {"A": "1", "E": ""}
    assert expand_env("${A} ${A:-x} ${B:-d} ${E:-d} [${B}]", env) == "1 1 d d []"


def test_defaults_and_expansion_in_values() -> None:
    """Unset sections take defaults; values expand after YAML parsing (no structure injection)."""
    cfg = parse_config(
        MIN + "server: {port: '${PORT:-9000}'}\nauth: {client_keys: [{name: a, key: '${K}'}]}\n",
        env={"K": "x: [1, 2]"},
    )
    assert cfg.server.port == 9000 and cfg.server.host == "127.0.0.1"
    assert cfg.database.path == "data/provider-router.db"
    assert cfg.auth.client_keys[0].key == "x: [1, 2]"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (MIN + "server: {prot: 1}\n", "server.prot"),
        (MIN + "server: {port: eighty}\n", "server.port"),
        ("providers: [{name: x, type: magic}]\n", "providers[0].type"),
        ("providers: [{name: x, type: openai, base_url: ftp://x}]\n", "providers[0].base_url"),
        ("providers: [{type: echo}]\n", "providers[0]"),
        (PROVIDERS + "models: [{name: m, provider: ghost}]\n", "models[0].provider"),
        (MIN + "auth: {client_keys: [{name: a, key: '${UNSET}'}]}\n", "auth.client_keys[0].key"),
        ("providers: {name: echo}\n", "providers"),
        (MIN + "logs: [1]\n", "logs"),
        ("server: [\n", "YAML"),
        ("providers: [{name: e, type: echo, headers: {Content-Length: '5'}}]\n", "providers[0].headers.Content-Length"),
        ("providers: [{name: e, type: echo, headers: {'X-É': '1'}}]\n", "providers[0].headers"),
    ],
)
def test_errors_name_the_key(text: str, named: str) -> None:
    """A wrong key, type or reference stops start-up with a message naming where it is."""
    with pytest.raises(ConfigError) as e:
        parse_config(text, env={})
    assert named in str(e.value)


def test_error_never_prints_the_value() -> None:
    """A type error names the key, not the (possibly secret) value."""
    with pytest.raises(ConfigError) as e:
        parse_config(MIN + "auth: {admin_key: [sk-secret-value]}\n", env={})
    assert "auth.admin_key" in str(e.value) and "sk-secret-value" not in str(e.value)


def test_shipped_config_serves_with_no_keys() -> None:
    """The repository's config.yaml loads with an empty environment and routes `echo`."""
    from pathlib import Path

    from provider_router.config import load_config
    from provider_router.routing import Router

    cfg = load_config(Path(__file__).parent.parent / "config.yaml", env={})
    router = Router(cfg)
    assert router.route("echo").provider.type == "echo"
    assert "gpt-*" not in [m.name for m in router.available]
    cfg = load_config(Path(__file__).parent.parent / "config.yaml", env={"OPENAI_API_KEY": "sk-x"})
    assert Router(cfg).route("gpt-4o-mini").provider.name == "openai"


@pytest.mark.parametrize("key", ["api_key", "headers.X-Org"])
def test_a_value_with_a_line_break_is_refused_without_showing_it(key: str) -> None:
    """A key pasted with its CRLF would split the upstream request: refused at start-up,
    named by key, the value not shown."""
    field = "api_key: '${K}'" if key == "api_key" else "headers: {X-Org: '${K}'}"
    text = f"providers: [{{name: up, type: openai, base_url: 'http://127.0.0.1:1/v1', {field}}}]\n"
    with pytest.raises(ConfigError) as e:
        parse_config(text + "models: [{name: m, provider: up}]\n", env={"K": "sk-secret-value\r\n"})
    assert f"providers[0].{key}" in str(e.value) and "sk-secret" not in str(e.value)


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("sessions: {cleanup_interval_minutes: 0}", "sessions.cleanup_interval_minutes"),
        ("sessions: {timeout_minutes: -5}", "sessions.timeout_minutes"),
        ("sessions: {max_sessions: 0}", "sessions.max_sessions"),
        ("sessions: {lock_wait_seconds: 0}", "sessions.lock_wait_seconds"),
        ("logs: {max_body_bytes: -1}", "logs.max_body_bytes"),
        ("logs: {level: verbose}", "logs.level"),
        ("logs: {queue_size: 0}", "logs.queue_size"),
        ("logs: {retention_days: -1}", "logs.retention_days"),
        ("server: {shutdown_grace_seconds: -1}", "server.shutdown_grace_seconds"),
        ("server: {max_body_bytes: 0}", "server.max_body_bytes"),
        ("database: {path: ''}", "database.path"),
        ("database: {check_interval_seconds: 0}", "database.check_interval_seconds"),
        ("database: {checkpoint_interval_seconds: .nan}", "database.checkpoint_interval_seconds"),
    ],
)
def test_settings_out_of_range_are_refused_by_key(setting: str, key: str) -> None:
    """Intervals, timeouts and sizes outside what the daemon can work with (a zero cleanup
    interval spins, a negative size drops a byte) are refused, naming the key."""
    with pytest.raises(ConfigError) as e:
        parse_config(MIN + setting + "\n", env={})
    assert str(e.value).startswith(key + ":")


@pytest.mark.parametrize(
    ("timeouts", "key"),
    [("{first_byte: -1}", "first_byte"), ("{connect: 0}", "connect"), ("{idle: .inf}", "idle")],
)
def test_provider_timeouts_out_of_range_are_refused(timeouts: str, key: str) -> None:
    """A provider's split timeouts must be real waits: refused by key, never by value."""
    text = f"providers: [{{name: up, type: openai, base_url: 'http://127.0.0.1:1/v1', timeouts: {timeouts}}}]\n"
    with pytest.raises(ConfigError) as e:
        parse_config(text + "models: [{name: m, provider: up}]\n", env={})
    assert str(e.value).startswith(f"providers[0].timeouts.{key}:")


def test_duplicate_model_names_and_unknown_providers_are_refused() -> None:
    """A second model entry of the same name could never be reached; a model naming no
    configured provider could never be served. Each is refused by its position."""
    with pytest.raises(ConfigError) as e:
        parse_config(PROVIDERS + "models: [{name: m, provider: echo}, {name: m, provider: echo}]\n", env={})
    assert str(e.value).startswith("models[1].name:") and "models[0]" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config(PROVIDERS + "models: [{name: m, provider: sk-looks-like-a-key}]\n", env={})
    assert str(e.value).startswith("models[0].provider:") and "sk-looks" not in str(e.value)


SECRET = "sk-live-0123456789abcdef"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (MIN + "server: {port: '${K}'}\n", "server.port"),
        (MIN + "auth: {metrics_public: '${K}'}\n", "auth.metrics_public"),
        (MIN + "logs: {level: '${K}'}\n", "logs.level"),
        ("providers: [{name: e, type: '${K}'}]\n", "providers[0].type"),
        ("providers: [{name: e, type: echo, timeouts: {idle: '${K}'}}]\n", "providers[0].timeouts.idle"),
        ("providers: [{name: e, type: echo, headers: {X-Key: ['${K}']}}]\n", "providers[0].headers"),
        ("providers: [{name: e, type: echo, api_key: {'${K}': 1}}]\n", "providers[0].api_key"),
        ("providers: [{name: e, type: echo}]\nmodels: [{name: m, provider: e, fallbacks: ['${K}']}]\n", "models[0].fallbacks"),
        (f"providers: [{{name: e, type: echo, api_key: {SECRET}: x}}]\n", "YAML"),
    ],
)
def test_a_secret_in_a_bad_value_never_reaches_the_error(text: str, key: str) -> None:
    """Whatever is wrong with a value (type, range, choice, shape, YAML syntax), the one-line
    error names where it is and never quotes it: the value may be a pasted API key."""
    with pytest.raises(ConfigError) as e:
        parse_config(text, env={"K": SECRET})
    message = str(e.value)
    assert key in message and "\n" not in message
    assert SECRET not in message and SECRET[:10] not in message


def test_unknown_keys_are_listed_with_the_known_ones() -> None:
    """A misspelt key is refused (it must not silently fall back to a default), and the
    message says which keys that place takes."""
    with pytest.raises(ConfigError) as e:
        parse_config("providers: [{name: e, type: echo, timeout: {idle: 5}}]\n", env={})
    assert "providers[0].timeout " in str(e.value) and "timeouts" in str(e.value)


def test_empty_keys_take_defaults_and_bare_numbers_read_as_text() -> None:
    """A key left empty (`server:`) takes its defaults; a bare number where text is expected
    (a header value, a model name) is that number's text; numbers from the environment fill
    numeric keys."""
    cfg = parse_config(
        "server:\nproviders: [{name: e, type: echo, headers: {X-Version: 2}, timeouts: {idle: '${T}'}}]\n"
        "models: [{name: 4, provider: e, upstream_model: null}]\n",
        env={"T": "2.5"},
    )
    assert cfg.server.port == 8080 and cfg.providers[0].headers == {"X-Version": "2"}
    assert cfg.providers[0].timeouts.idle == 2.5
    assert cfg.models[0].name == "4" and cfg.models[0].upstream_model is None


@pytest.mark.parametrize("value", ["$ADMIN_KEY", "${ADMIN_KEY", "key-$ADMIN_KEY", "${ADMIN_KEY:-x"])
def test_a_reference_that_is_not_one_is_refused_not_kept_as_text(value: str) -> None:
    """`$VAR` (shell style) or an unclosed `${VAR` is not expanded: kept as text it would
    become the key itself (an admin key anyone can guess), so start-up stops naming where."""
    with pytest.raises(ConfigError) as e:
        parse_config(MIN + f"auth: {{admin_key: '{value}'}}\n", env={"ADMIN_KEY": "s3cret-value"})
    assert "auth.admin_key" in str(e.value) and "${VAR}" in str(e.value) and "s3cret" not in str(e.value)


def test_a_dollar_sign_is_written_twice_and_values_from_the_environment_are_kept_whole() -> None:
    """`$$` is a literal `$`; a `$` not before a name is text; an expanded value is never
    read again (its own `$` stays)."""
    cfg = parse_config(MIN + "auth: {admin_key: 'a$$b$ c-${K}'}\n", env={"K": "x$Y${Z}"})
    assert cfg.auth.admin_key == "a$b$ c-x$Y${Z}"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (MIN + "auth:\n  client_keys: [{name: a, key: k}]\nauth:\n  metrics_public: true\n", "`auth` given twice"),
        (MIN + "server: {port: 1, port: 2}\n", "`port` given twice"),
        ("providers:\n  - name: e\n    type: echo\n    name: f\nmodels: [{name: m, provider: e}]\n", "`name` given twice"),
    ],
)
def test_a_key_given_twice_is_refused(text: str, where: str) -> None:
    """YAML lets a later key replace an earlier one silently: a second `auth:` block would
    drop the client keys of the first and open the proxy. Start-up stops instead, saying
    which key and both lines."""
    with pytest.raises(ConfigError) as e:
        parse_config(text, env={})
    assert where in str(e.value) and "line" in str(e.value)
