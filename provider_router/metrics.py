"""Prometheus metrics: request counters and latency histograms observed per request, and
gauges (sessions, log queue) read from the live state at scrape time.

One registry per app, so several apps in one process (tests) never share series.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .state import State
    from .store.records import RequestRecord

# Milliseconds: proxies are judged on single-digit ms overhead, LLM replies take seconds.
_BUCKETS_MS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_MODELS = 200


class _Live(Collector):
    """Gauges computed from the app's state when scraped."""

    def __init__(self, state: State) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        threads, writer = self._state.threads, self._state.writer
        if threads is not None:
            st = threads.stats()
            yield GaugeMetricFamily("provider_router_sessions_active", "Active sessions.", value=st["active"])
            yield CounterMetricFamily("provider_router_sessions_created", "Sessions created.", value=st["created_total"])
            yield CounterMetricFamily("provider_router_sessions_expired", "Sessions expired.", value=st["expired_total"])
            yield CounterMetricFamily("provider_router_sessions_evicted", "Sessions evicted (max_sessions).", value=st["evicted_total"])
            yield GaugeMetricFamily(
                "provider_router_session_oldest_age_seconds", "Age of the oldest active session.", value=st["oldest_age_seconds"] or 0
            )
        if writer is not None:
            yield GaugeMetricFamily("provider_router_log_queue_depth", "Records and changes waiting for the writer.", value=writer.depth)
            yield CounterMetricFamily("provider_router_log_records_written", "Request records committed.", value=writer.written)
            yield CounterMetricFamily("provider_router_log_records_dropped", "Records dropped: queue full.", value=writer.dropped)
            yield CounterMetricFamily("provider_router_log_write_failures", "Rows that could not be written.", value=writer.failed)


class Metrics:
    """`observe(record)` once per finished /v1 request; `render()` for `GET /metrics`."""

    def __init__(self, state: State) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "provider_router_requests",
            "Requests to /v1, by model, provider and outcome.",
            ("model", "provider", "outcome"),
            registry=self.registry,
        )
        self.ttfb = Histogram(
            "provider_router_ttfb_ms", "Time to first byte to the client (ms).", ("provider",),
            buckets=_BUCKETS_MS, registry=self.registry,
        )
        self.duration = Histogram(
            "provider_router_duration_ms", "Request duration (ms).", ("provider",),
            buckets=_BUCKETS_MS, registry=self.registry,
        )
        self.registry.register(_Live(state))
        self._models: set[str] = set()
        # labels() takes a lock and builds a key on every call; the children never change.
        self._children: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}

    def _model_label(self, rec: RequestRecord) -> str:
        # Only routed names become labels, and at most MAX_MODELS of them: a client's
        # free-text model names (think `*` routes) must not mint unbounded series.
        if rec.model is None or rec.provider is None:
            return "none"
        if rec.model not in self._models:
            if len(self._models) >= MAX_MODELS:
                return "other"
            self._models.add(rec.model)
        return rec.model

    def observe(self, rec: RequestRecord) -> None:
        key = (rec.model or "", rec.provider or "none", rec.outcome or "none")
        children = self._children.get(key)
        if children is None:
            provider = key[1]
            children = (
                self.requests.labels(self._model_label(rec), provider, key[2]),
                self.ttfb.labels(provider),
                self.duration.labels(provider),
            )
            if len(self._children) < 4 * MAX_MODELS:
                self._children[key] = children
        children[0].inc()
        if rec.ttfb_ms is not None:
            children[1].observe(rec.ttfb_ms)
        if rec.duration_ms is not None:
            children[2].observe(rec.duration_ms)

    def render(self) -> bytes:
        return generate_latest(self.registry)
