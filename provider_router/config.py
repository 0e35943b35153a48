"""Typed configuration: YAML with ``${VAR}`` / ``${VAR:-default}`` expansion, converted and
validated by msgspec into frozen structs, then checked across fields.

A wrong key, type or range stops start-up with a `ConfigError` naming the key's path
(``providers[1].timeouts.idle``), never printing the value (it may be a secret).
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, get_args
from urllib.parse import urlsplit

import msgspec
import msgspec.inspect
import yaml
from msgspec import Meta, field

from . import location

ProviderType = Literal["openai", "echo", "qwen"]
LogLevel = Literal["debug", "info", "warning", "error"]
PROVIDER_TYPES: tuple[str, ...] = get_args(ProviderType)
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)
# `${VAR}` or `${VAR:-default}`; `$$` is a literal `$`; any other `$` before a name or a
# brace (`$VAR`, an unclosed `${VAR`) is a mistake, refused rather than kept as text.
_ENV_RE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|(\$)|(?=[{A-Za-z_]))")

# Ranges the daemon can work with: a zero interval spins, a negative size drops a byte.
# A NaN fails every bound, so each of these is also finite.
_Wait = Annotated[float, Meta(gt=0, le=86_400)]  # a split timeout: a real wait, at most a day
_Bytes = Annotated[int, Meta(ge=0, le=2**40)]
_LargeBytes = Annotated[int, Meta(ge=1024, le=2**40)]
_Count = Annotated[int, Meta(ge=1, le=10_000_000)]


class ConfigError(ValueError):
    """The config file is unreadable or does not validate; the message names the key."""


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A config mapping: unknown keys are refused (a typo must not silently fall back).
    Its repr masks secrets: a traceback's locals show configs, cut short where the
    redactor would not recognise a secret any more."""

    def __repr__(self) -> str:
        fields = []
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if name in _SECRET_FIELDS and value:
                value = location.shown(value) if name == "url" else "***"
            fields.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(fields)})"


# The fields holding secrets (or, `proxy` and `url`, URLs that may carry one).
_SECRET_FIELDS = frozenset({"api_key", "token", "cookie", "headers", "key", "admin_key", "url", "proxy"})


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8080  # 0 picks a free port
    max_body_bytes: Annotated[int, Meta(gt=0, le=2**40)] = 8 * 1024 * 1024
    shutdown_grace_seconds: Annotated[float, Meta(ge=0, le=3600)] = 10.0
    # Processes serving the port, sharing the database (`serve --workers N`); 1: one daemon.
    workers: Annotated[int, Meta(ge=1, le=64)] = 1


class DatabaseConfig(_Section):
    """`location`: where the log database is, the `url` if set, else the SQLite `path`."""

    path: str = "data/provider-router.db"
    # A PostgreSQL URL (postgresql://user:password@host/dbname): the shared store of several
    # instances, instead of the SQLite file at `path`.
    url: str = ""
    # The most connections each instance's pool opens for reads and session state (its log
    # writer and its lock connection come on top: see docs/postgresql.md).
    pool_max: Annotated[int, Meta(ge=1, le=1000)] = 8

    # Is the file still the one opened; are records written.
    check_interval_seconds: Annotated[float, Meta(ge=0.05, le=60)] = 1.0
    # Truncate the WAL when no reader holds it back.
    checkpoint_interval_seconds: Annotated[float, Meta(ge=1, le=86_400)] = 60.0

    @property
    def location(self) -> str:
        return self.url or self.path


class LogsConfig(_Section):
    retention_days: Annotated[int, Meta(ge=0, le=36_500)] = 0  # 0 keeps records forever
    max_body_bytes: _Bytes = 8 * 1024 * 1024  # a body that is not a chat request, or an error body
    max_message_bytes: _LargeBytes = 8 * 1024 * 1024  # one message of a conversation
    queue_size: _Count = 10_000  # records not yet committed...
    queue_bytes: _LargeBytes = 256 * 1024 * 1024  # ...and their bytes
    when_full: Literal["wait", "drop"] = "wait"  # wait: new requests wait for room; drop: records are dropped and counted
    level: LogLevel = "info"


class TimeoutsConfig(_Section):
    """Split timeouts: there is deliberately no total cap on a healthy stream."""

    connect: _Wait = 10.0
    first_byte: _Wait = 120.0
    idle: _Wait = 120.0


class ProviderConfig(_Section):
    name: str
    type: ProviderType
    base_url: str = ""
    api_key: str = ""
    token: str = ""
    headers: dict[str, str] = {}
    cookie: str = ""
    retries: Annotated[int, Meta(ge=0, le=10)] = 0
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


class ModelConfig(_Section):
    name: str
    provider: str
    upstream_model: str | None = None
    fallbacks: tuple[str, ...] = ()


class ClientKey(_Section):
    name: str
    key: str


class AuthConfig(_Section):
    client_keys: tuple[ClientKey, ...] = ()
    admin_key: str = ""
    metrics_public: bool = False


class SessionsConfig(_Section):
    timeout_minutes: Annotated[float, Meta(gt=0, le=525_600)] = 30.0
    cleanup_interval_minutes: Annotated[float, Meta(ge=1 / 60, le=1440)] = 10.0  # at least a second
    max_sessions: _Count = 10_000
    lock_wait_seconds: _Wait = 60.0


class Config(_Section):
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
        out += location.secrets(self.database.url)
        out += [p.cookie for p in self.providers]
        out += [v for p in self.providers for v in p.headers.values()]
        out += [k.key for k in self.auth.client_keys] + [self.auth.admin_key]
        return [s for s in out if s and len(s) >= 4]


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def expand_env(text: str, env: Mapping[str, str]) -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}``; an unset ``${VAR}`` becomes empty; ``$$``
    is ``$``. ValueError for a ``$`` that starts no reference (``$VAR``, ``${VAR``): kept as
    text, it would become the value (a guessable admin key) without a word."""

    def sub(m: re.Match[str]) -> str:
        if m.group(3):
            return "$"
        if m.group(1) is None:
            raise ValueError("a `$` that starts no ${VAR} reference (write ${VAR}, or $$ for a literal $)")
        value = env.get(m.group(1))
        if value is None or (value == "" and m.group(2) is not None):
            return m.group(2) or ""
        return value

    return _ENV_RE.sub(sub, text)


def _prepare(node: Any, env: Mapping[str, str], path: str = "") -> Any:
    """Expand ``${VAR}`` in the parsed tree (after parsing, so a value containing YAML syntax
    cannot change the structure) and hand numbers on as text: expansion yields text anyway,
    msgspec's lax mode reads numeric fields back from it, and a string field then takes a
    bare `2` (a header value, a model name) as "2". A key left empty takes its default."""
    if isinstance(node, str):
        try:
            return expand_env(node, env)
        except ValueError as e:
            raise ConfigError(f"{path or 'config'}: {e}") from None
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return str(node)
    if isinstance(node, list):
        return [_prepare(v, env, f"{path}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, dict):
        named = ((k if isinstance(k, str) else str(k), v) for k, v in node.items() if v is not None)
        return {k: _prepare(v, env, f"{path}.{k}" if path else k) for k, v in named}
    return node


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last
    one without a word, and a second `auth:` block would drop the first one's client keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is None or key == "<<":
                continue
            if key in seen:
                shown = f"`{key}`" if _PLAIN_KEY.fullmatch(key) else "a key"  # never a value-like key: it may be a secret
                first = seen[key].start_mark.line + 1
                raise yaml.constructor.ConstructorError(None, None, f"{shown} given twice in one mapping (first at line {first})", key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep)


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,40}")


def parse_config(text: str, env: Mapping[str, str] | None = None, only: str | None = None) -> Config:
    """Parse and validate YAML text into a `Config`. With `only` (a section's name), that
    section alone is read and checked, and the others take their defaults: a command that
    needs only the database's path must not fail because a client key's variable is unset
    in the shell it runs in."""
    try:
        raw = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        # Not str(e): PyYAML quotes the offending line, which may hold a key.
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config is not valid YAML{where}: {getattr(e, 'problem', None) or 'unreadable'}") from None
    raw = {} if raw is None else raw
    if only is not None and isinstance(raw, dict):
        raw = {only: raw[only]} if only in raw else {}
    try:
        cfg = msgspec.convert(_prepare(raw, os.environ if env is None else env), Config, strict=False)
    except msgspec.ValidationError as e:
        raise _named(e) from None
    if only is None:
        _validate(cfg)
    return cfg


def load_config(path: str | Path, env: Mapping[str, str] | None = None, only: str | None = None) -> Config:
    """Read, expand and validate the config file at `path` (or only its section `only`)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    return parse_config(text, env, only)


def _named(e: msgspec.ValidationError) -> ConfigError:
    """msgspec's error rewritten as ``path: what is wrong``. Only message shapes known to
    carry no value pass through (an enum error, for one, quotes the value it got)."""
    what, _, at = str(e).partition(" - at `$")
    path = at.rstrip("`").lstrip(".")
    if m := re.fullmatch(r"Object contains unknown field `(.*)`", what):
        known = ", ".join(f.name for f in _type_at(path).fields)
        return ConfigError(f"unknown key {path + '.' if path else ''}{m.group(1)} (known: {known})")
    if what.startswith("Invalid enum value"):
        what = "must be one of " + ", ".join(map(str, _type_at(path).values))
    elif m := re.fullmatch(r"Expected (`[^`]+`)(?: ([<>]=?) ([-\d.e+]+))?(?:, got `(\w+)`)?", what):
        bound = f" {m.group(2)} {float(m.group(3)):.6g}" if m.group(3) else ""
        # Every scalar arrives as text (see `_prepare`), so "got str" would mislead.
        got = f", got `{m.group(4)}`" if m.group(4) not in (None, "str") else ""
        what = f"expected {m.group(1)}{bound}{got}"
    elif m := re.fullmatch(r"Object missing required field `(\w+)`", what):
        what = f"missing required key {m.group(1)}"
    else:
        what = "invalid value"
    return ConfigError(f"{path or 'config'}: {what}")


def _type_at(path: str) -> Any:
    """The msgspec type description of the config at `path` (``providers[0].timeouts``)."""
    t: Any = msgspec.inspect.type_info(Config)
    for name, index in re.findall(r"(\w+)|(\[[^\]]*\])", path):
        t = t.item_type if index else next(f.type for f in t.fields if f.name == name)
    return t


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110 5.1)
# How a request is framed on the wire is the HTTP client's business, never a provider's.
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade"})


def _validate(cfg: Config) -> None:
    """What one field's type cannot say: references between entries, header rules."""
    names: set[str] = set()
    for i, p in enumerate(cfg.providers):
        where = f"providers[{i}]"
        if p.name in names:
            raise ConfigError(f"{where}.name: the same name as an earlier provider")
        names.add(p.name)
        if p.type in ("openai", "qwen") and not p.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}.base_url: must be an http(s) URL")
        _check_headers(p, where)
    model_names = {m.name for m in cfg.models}
    first: dict[str, int] = {}
    for i, m in enumerate(cfg.models):
        if m.name in first:
            # The first match wins: a second entry of the same name could never be reached.
            raise ConfigError(f"models[{i}].name: the same name as models[{first[m.name]}]; the second is unreachable")
        first[m.name] = i
        if m.provider not in names:
            raise ConfigError(f"models[{i}].provider: no provider of that name")
        if any(fb not in model_names for fb in m.fallbacks):
            raise ConfigError(f"models[{i}].fallbacks: names no configured model")
    for i, k in enumerate(cfg.auth.client_keys):
        if not k.key:
            raise ConfigError(f"auth.client_keys[{i}].key: empty (is its environment variable set?)")
    if not cfg.database.path.strip():
        raise ConfigError("database.path: empty")
    if cfg.database.url and not location.is_postgres(cfg.database.url):
        raise ConfigError("database.url: must be a postgresql:// URL (a SQLite file goes in database.path)")
    if why := location.refused(cfg.database.path):
        raise ConfigError(f"database.path: {why}")


def _check_headers(p: ProviderConfig, where: str) -> None:
    # These travel as HTTP header values: a line break (say, a key pasted with its CRLF)
    # would split the request. Named by key; the value itself is never shown.
    values = {"api_key": p.api_key, "token": p.token, "cookie": p.cookie}
    values.update({f"headers.{k}": v for k, v in p.headers.items()})
    for key, value in values.items():
        if any(c in value for c in "\r\n\0"):
            raise ConfigError(f"{where}.{key}: contains a line break or NUL")
    for k in p.headers:
        if not _TOKEN.fullmatch(k):
            raise ConfigError(f"{where}.headers: {k!r} is not a valid header name")
        if k.lower() in _FRAMING_HEADERS:
            raise ConfigError(f"{where}.headers.{k}: set by the proxy for each request, not configurable")
