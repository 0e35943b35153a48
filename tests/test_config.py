"""Config: env expansion, defaults, and start-up errors that name the offending key."""

from __future__ import annotations

import pytest

from provider_router.config import ConfigError, expand_env, parse_config

MIN = "providers: [{name: echo, type: echo}]\nmodels: [{name: echo, provider: echo}]\n"


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
        (MIN + "models: [{name: m, provider: ghost}]\n", "models[0].provider"),
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
