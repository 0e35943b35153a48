"""Model routing: the client's `model` -> (provider, upstream model). First match wins.

Names may be `*` globs. Routes whose provider is switched off (no key) are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from .config import Config, ModelConfig, ProviderConfig


@dataclass(frozen=True, slots=True)
class Route:
    model: ModelConfig
    provider: ProviderConfig
    upstream_model: str


def is_glob(name: str) -> bool:
    """A model route's name that is a pattern (`llama*`), not one name."""
    return any(c in name for c in "*?[")


class NoRoute(LookupError):
    """No enabled route; `str()` is a message fit for the client."""


class Router:
    def __init__(self, cfg: Config) -> None:
        self._providers = {p.name: p for p in cfg.providers}
        self._models = cfg.models
        self._cache: dict[str, Route | str] = {}

    @property
    def available(self) -> list[ModelConfig]:
        return [m for m in self._models if self._providers[m.provider].enabled]

    def route(self, model: str) -> Route:
        """The route for `model`, or raise `NoRoute`."""
        hit = self._cache.get(model)
        if hit is None:
            hit = self._resolve(model)
            if len(self._cache) < 4096:  # clients send few distinct names; bound it anyway
                self._cache[model] = hit
        if isinstance(hit, str):
            raise NoRoute(hit)
        return hit

    def _resolve(self, model: str) -> Route | str:
        disabled: ProviderConfig | None = None
        for m in self._models:
            if not fnmatchcase(model, m.name):
                continue
            p = self._providers[m.provider]
            if not p.enabled:
                disabled = disabled or p
                continue
            upstream = m.upstream_model or model
            return Route(m, p, upstream)
        names = self._available_text()
        if disabled is not None:
            return (
                f"The model `{model}` routes to provider `{disabled.name}`, which is switched off "
                f"(no api_key configured). Available models: {names}"
            )
        return f"The model `{model}` does not exist or is not routed. Available models: {names}"

    def _available_text(self) -> str:
        """The routable models as a client can send them: exact names, then the patterns
        (a pattern is not a name to send; `GET /v1/models` lists the names it matches)."""
        exact = [m.name for m in self.available if not is_glob(m.name)]
        patterns = [m.name for m in self.available if is_glob(m.name)]
        text = ", ".join(exact) or "none"
        if patterns:
            text += f"; and names matching {', '.join(patterns)} (GET /v1/models lists them)"
        return text

    def chain(self, model: str) -> list[Route]:
        """The route for `model`, then its configured fallbacks that are routable."""
        first = self.route(model)
        routes = [first]
        for name in first.model.fallbacks:
            try:
                r = self.route(name)
            except NoRoute:
                continue  # a fallback whose provider is switched off
            if r not in routes:
                routes.append(r)
        return routes
