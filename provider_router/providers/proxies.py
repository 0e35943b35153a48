"""Which forward proxy an upstream is reached through: the provider's `proxy:` setting, else
the daemon's own HTTPS_PROXY / HTTP_PROXY / NO_PROXY, resolved once at start-up.
"""

from __future__ import annotations

import urllib.request
from typing import Iterable, Mapping
from urllib.parse import urlsplit

import yarl

from ..config import ProviderConfig


def proxy_for(url: str, configured: str, env: Mapping[str, str] | None = None) -> str | None:
    """The proxy that `url` is reached through: the provider's `proxy:` if set ("direct"
    for none), else `HTTPS_PROXY`/`HTTP_PROXY` for its scheme unless `NO_PROXY` matches."""
    if configured:
        return None if configured == "direct" else configured
    proxies = urllib.request.getproxies_environment() if env is None else _env_proxies(env)
    parts = urlsplit(url)
    proxy = proxies.get(parts.scheme)
    if not proxy:
        return None
    host = parts.hostname or ""
    no_proxy = proxies.get("no")
    if no_proxy and (no_proxy.strip() == "*" or urllib.request.proxy_bypass_environment(host, {"no": no_proxy})):
        return None
    return proxy


def proxy_secrets(providers: Iterable[ProviderConfig]) -> list[str]:
    """The passwords in the proxy URLs the providers will use, for redaction beside the
    configured secrets (`Config.secrets` knows only the config file's own fields)."""
    out = []
    for p in providers:
        if p.type in ("openai", "qwen"):
            proxy = proxy_for(p.base_url, p.proxy)
            password = yarl.URL(proxy).password if proxy else None
            if password and len(password) >= 4:
                out.append(password)
    return out


def _env_proxies(env: Mapping[str, str]) -> dict[str, str]:
    # As urllib reads os.environ: lower case wins over upper case.
    out: dict[str, str] = {}
    for name in sorted(env, key=lambda n: n.islower()):
        if name.lower().endswith("_proxy") and env[name]:
            out[name.lower()[: -len("_proxy")]] = env[name]
    return out
