"""Typed configuration: YAML with ``${VAR}`` / ``${VAR:-default}`` expansion, validated.

A wrong key or a wrong type stops start-up with a `ConfigError` naming the key's path
(``providers[1].base_url``), never printing the value (it may be a secret).
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

import yaml

PROVIDER_TYPES = ("openai", "echo", "qwen")
LOG_LEVELS = ("debug", "info", "warning", "error")
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(ValueError):
    """The config file is unreadable or does not validate; the message names the key."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 8 * 1024 * 1024
    shutdown_grace_seconds: float = 10.0


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    path: str = "data/provider-router.db"
    check_interval_seconds: float = 1.0  # is the file still the one opened; are records written
    checkpoint_interval_seconds: float = 60.0  # truncate the WAL when no reader holds it back


@dataclass(frozen=True, slots=True)
class LogsConfig:
    retention_days: int = 0  # 0 keeps records forever
    max_body_bytes: int = 8 * 1024 * 1024  # a body that is not a chat request, or an error body
    max_message_bytes: int = 8 * 1024 * 1024  # one message of a conversation
    queue_size: int = 10_000  # records not yet committed...
    queue_bytes: int = 256 * 1024 * 1024  # ...and their bytes
    when_full: str = "wait"  # wait: new requests wait for room; drop: records are dropped and counted
    level: str = "info"


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    """Split timeouts: there is deliberately no total cap on a healthy stream."""

    connect: float = 10.0
    first_byte: float = 120.0
    idle: float = 120.0


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    type: str
    base_url: str = ""
    api_key: str = ""
    token: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    cookie: str = ""
    retries: int = 0
    delete_chats_on_expiry: bool = False
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    # The upstream client (providers/http.py).
    proxy: str = ""  # a forward proxy URL; "direct" for none; empty: HTTPS_PROXY/HTTP_PROXY/NO_PROXY decide
    ca_bundle: str = ""  # a PEM file of CAs trusted besides the system store
    max_connections: int = 2048  # in use at once to this provider; 0: unlimited
    max_header_bytes: int = 8190  # one line of an upstream's response head (at most 128 fields)
    max_line_bytes: int = 4 * 1024 * 1024  # one line of an upstream's event stream
    retry_after_max_seconds: float = 10.0  # the longest a retry waits for an upstream's Retry-After

    @property
    def enabled(self) -> bool:
        """An `openai` provider aimed at a remote host switches on only when it has a key."""
        if self.type != "openai":
            return True
        return bool(self.api_key) or is_loopback(urlsplit(self.base_url).hostname or "")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    provider: str
    upstream_model: str | None = None
    fallbacks: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ClientKey:
    name: str
    key: str


@dataclass(frozen=True, slots=True)
class AuthConfig:
    client_keys: tuple[ClientKey, ...] = ()
    admin_key: str = ""
    metrics_public: bool = False


@dataclass(frozen=True, slots=True)
class SessionsConfig:
    timeout_minutes: float = 30.0
    cleanup_interval_minutes: float = 10.0
    max_sessions: int = 10_000
    lock_wait_seconds: float = 60.0


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    logs: LogsConfig = field(default_factory=LogsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    providers: tuple[ProviderConfig, ...] = ()
    models: tuple[ModelConfig, ...] = ()

    def secrets(self) -> list[str]:
        """Every configured secret value, for redaction."""
        out = [p.api_key for p in self.providers] + [p.token for p in self.providers]
        out += [p.cookie for p in self.providers]
        out += [v for p in self.providers for v in p.headers.values()]
        out += [k.key for k in self.auth.client_keys] + [self.auth.admin_key]
        return [s for s in out if s and len(s) >= 4]


# The config classes a field annotation may name (annotations are strings here).
_NESTED: dict[str, type] = {
    c.__name__: c
    for c in (
        ServerConfig, DatabaseConfig, LogsConfig, AuthConfig, SessionsConfig,
        TimeoutsConfig, ProviderConfig, ModelConfig, ClientKey,
    )
}


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def expand_env(text: str, env: Mapping[str, str]) -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}``; an unset ``${VAR}`` becomes empty."""

    def sub(m: re.Match[str]) -> str:
        value = env.get(m.group(1))
        if value is None or (value == "" and m.group(2) is not None):
            return m.group(2) or ""
        return value

    return _ENV_RE.sub(sub, text)


def _expand_tree(node: Any, env: Mapping[str, str]) -> Any:
    # Expand after parsing, so a value containing YAML syntax cannot change the structure.
    if isinstance(node, str):
        return expand_env(node, env)
    if isinstance(node, list):
        return [_expand_tree(v, env) for v in node]
    if isinstance(node, dict):
        return {k: _expand_tree(v, env) for k, v in node.items()}
    return node


def _build(cls: type, data: Any, path: str) -> Any:
    """Build dataclass `cls` from a mapping, checking keys and scalar types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown key {where}{unknown[0]} (known: {', '.join(sorted(known))})")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        kwargs[name] = _coerce(known[name].type, value, f"{path}.{name}" if path else name)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required key is missing
        missing = str(e).split("argument")[-1].strip(": ")
        raise ConfigError(f"{path or 'config'}: missing required key {missing}") from None


def _coerce(annotation: str, value: Any, path: str) -> Any:
    ann = str(annotation)
    nested = _NESTED.get(ann)
    if nested is not None:
        return _build(nested, value, path)
    if ann.startswith("tuple["):
        item = ann[len("tuple[") :].split(",")[0].strip()
        if value is None:
            return ()
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        if item in _NESTED:
            return tuple(_build(_NESTED[item], v, f"{path}[{i}]") for i, v in enumerate(value))
        return tuple(_scalar("str", v, f"{path}[{i}]") for i, v in enumerate(value))
    if ann.startswith("Mapping["):
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return {str(k): _scalar("str", v, f"{path}.{k}") for k, v in value.items()}
    return _scalar(ann, value, path)


def _scalar(ann: str, value: Any, path: str) -> Any:
    optional = "None" in ann
    base = ann.replace("| None", "").strip()
    if value is None and optional:
        return None
    if base == "str":
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif base == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif base == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif base == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    expected = {"str": "a string", "bool": "true or false", "int": "an integer", "float": "a number"}
    raise ConfigError(f"{path}: expected {expected.get(base, base)}, got {type(value).__name__}")



def parse_config(text: str, env: Mapping[str, str] | None = None) -> Config:
    """Parse and validate YAML text into a `Config`."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config is not valid YAML: {e}") from None
    cfg: Config = _build(Config, _expand_tree(raw, os.environ if env is None else env), "")
    _validate(cfg)
    return cfg


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read, expand and validate the config file at `path`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    return parse_config(text, env)



_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110 5.1)
# How a request is framed on the wire is the HTTP client's business, never a provider's.
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade"})

def _validate(cfg: Config) -> None:
    names: set[str] = set()
    for i, p in enumerate(cfg.providers):
        where = f"providers[{i}]"
        if p.type not in PROVIDER_TYPES:
            raise ConfigError(f"{where}.type: must be one of {', '.join(PROVIDER_TYPES)}")
        if p.name in names:
            raise ConfigError(f"{where}.name: the same name as an earlier provider")
        names.add(p.name)
        if p.type in ("openai", "qwen") and not p.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}.base_url: must be an http(s) URL")
        # These travel as HTTP header values: a line break (say, a key pasted with its
        # CRLF) would split the request. Named by key; the value itself is never shown.
        fields = {"api_key": p.api_key, "token": p.token, "cookie": p.cookie}
        fields.update({f"headers.{k}": v for k, v in p.headers.items()})
        for key, value in fields.items():
            if any(c in value for c in "\r\n\0"):
                raise ConfigError(f"{where}.{key}: contains a line break or NUL")
        for k in p.headers:
            if not _TOKEN.fullmatch(k):
                raise ConfigError(f"{where}.headers: {k!r} is not a valid header name")
            if k.lower() in _FRAMING_HEADERS:
                raise ConfigError(f"{where}.headers.{k}: set by the proxy for each request, not configurable")
        _check_timeouts(p.timeouts, f"{where}.timeouts")
        _in_range(f"{where}.retries", p.retries, 0, 10)
    model_names = {m.name for m in cfg.models}
    first: dict[str, int] = {}
    for i, m in enumerate(cfg.models):
        if m.name in first:
            # The first match wins: a second entry of the same name could never be reached.
            raise ConfigError(f"models[{i}].name: the same name as models[{first[m.name]}]; the second is unreachable")
        first[m.name] = i
        if m.provider not in names:
            raise ConfigError(f"models[{i}].provider: no provider of that name")
        for fb in m.fallbacks:
            if fb not in model_names:
                raise ConfigError(f"models[{i}].fallbacks: names no configured model")
    for i, k in enumerate(cfg.auth.client_keys):
        if not k.key:
            raise ConfigError(f"auth.client_keys[{i}].key: empty (is its environment variable set?)")
    _check_ranges(cfg)


def _in_range(key: str, value: float, lo: float, hi: float, *, above: bool = False) -> None:
    """`lo <= value <= hi` (`lo < value` with `above`), finite; the error names the key only."""
    low_ok = value > lo if above else value >= lo
    if not (math.isfinite(value) and low_ok and value <= hi):
        raise ConfigError(f"{key}: must be {'more than' if above else 'at least'} {lo:g} and at most {hi:g}")


def _check_timeouts(t: TimeoutsConfig, where: str) -> None:
    # No total cap on a stream; each split timeout must still be a real wait.
    for name in ("connect", "first_byte", "idle"):
        _in_range(f"{where}.{name}", getattr(t, name), 0, 86_400, above=True)


def _check_ranges(cfg: Config) -> None:
    """Every interval, timeout and size within what the daemon can work with: a zero
    cleanup interval spins, a negative timeout fails every request."""
    s, d, lg, se = cfg.server, cfg.database, cfg.logs, cfg.sessions
    if not 0 < s.port < 65536 and s.port != 0:
        raise ConfigError("server.port: must be 0..65535")
    _in_range("server.max_body_bytes", s.max_body_bytes, 0, 2**40, above=True)
    _in_range("server.shutdown_grace_seconds", s.shutdown_grace_seconds, 0, 3600)
    if not d.path.strip():
        raise ConfigError("database.path: empty")
    _in_range("database.check_interval_seconds", d.check_interval_seconds, 0.05, 60)
    _in_range("database.checkpoint_interval_seconds", d.checkpoint_interval_seconds, 1, 86_400)
    _in_range("logs.retention_days", lg.retention_days, 0, 36_500)
    _in_range("logs.max_body_bytes", lg.max_body_bytes, 0, 2**40)
    _in_range("logs.queue_size", lg.queue_size, 1, 10_000_000)
    if lg.level not in LOG_LEVELS:
        raise ConfigError(f"logs.level: must be one of {', '.join(LOG_LEVELS)}")
    _in_range("sessions.timeout_minutes", se.timeout_minutes, 0, 525_600, above=True)
    _in_range("sessions.cleanup_interval_minutes", se.cleanup_interval_minutes, 1 / 60, 1440)  # at least a second
    _in_range("sessions.max_sessions", se.max_sessions, 1, 10_000_000)
    _in_range("sessions.lock_wait_seconds", se.lock_wait_seconds, 0, 86_400, above=True)
    if lg.when_full not in ("wait", "drop"):
        raise ConfigError("logs.when_full: must be wait or drop")
    _in_range("logs.max_message_bytes", lg.max_message_bytes, 1024, 2**40)
    _in_range("logs.queue_bytes", lg.queue_bytes, 1024, 2**40)
