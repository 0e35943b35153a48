"""Prometheus metrics: request counters and latency histograms observed per request, and
gauges (sessions, log queue) read from the live state at scrape time.

One registry per app, so several apps in one process (tests) never share series.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
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
        ups = [(name, up) for name, p in self._state.providers.items() if (up := getattr(p, "upstream", None)) is not None]
        if ups:
            in_use = GaugeMetricFamily(
                "provider_router_upstream_slots_in_use", "Upstream calls holding a connection slot (max_connections).", labels=("provider",)
            )
            waiting = GaugeMetricFamily("provider_router_upstream_waiting", "Upstream calls waiting for a connection slot.", labels=("provider",))
            for name, up in ups:
                in_use.add_metric((name,), up.in_use)
                waiting.add_metric((name,), up.waiting)
            yield in_use
            yield waiting
        if writer is not None:
            yield GaugeMetricFamily("provider_router_log_queue_depth", "Records and changes waiting for the writer.", value=writer.depth)
            yield CounterMetricFamily("provider_router_log_records_written", "Request records committed.", value=writer.written)
            yield CounterMetricFamily("provider_router_log_records_dropped", "Records dropped: queue full.", value=writer.dropped)
            yield CounterMetricFamily("provider_router_log_write_failures", "Rows that could not be written.", value=writer.failed)
        watch = self._state.watch
        if watch is not None:
            s = watch.summary()
            yield GaugeMetricFamily("provider_router_log_queue_bound", "Records the log queue holds before dropping.", value=s["queue_bound"])
            state = GaugeMetricFamily("provider_router_log_state", "1 for the log writer's current state.", labels=("state",))
            for name in ("ok", "failing", "stalled"):
                state.add_metric((name,), 1.0 if s["state"] == name else 0.0)
            yield state
            yield GaugeMetricFamily(
                "provider_router_database_file_ok", "1 while the file at the configured path is the one opened.", value=1.0 if s["file"] == "ok" else 0.0
            )
            yield CounterMetricFamily("provider_router_database_reopened", "Times the database path was reopened.", value=s["reopened"])
            yield CounterMetricFamily(
                "provider_router_log_records_lost", "Records committed into a database file no longer at the path.", value=watch.lost
            )


class _Tally:
    """One (model, provider, outcome) series: a request count and two latency histograms
    kept as plain per-bucket counts (made cumulative when scraped)."""

    __slots__ = ("requests", "ttfb", "ttfb_sum", "duration", "duration_sum")

    def __init__(self) -> None:
        self.requests = 0
        self.ttfb = [0] * (len(_BUCKETS_MS) + 1)  # the last one is +Inf
        self.ttfb_sum = 0.0
        self.duration = [0] * (len(_BUCKETS_MS) + 1)
        self.duration_sum = 0.0


def _buckets(counts: list[int]) -> list[tuple[str, float]]:
    out, total = [], 0
    for bound, n in zip((*map(str, _BUCKETS_MS), "+Inf"), counts):
        total += n
        out.append((bound, float(total)))
    return out


class _Requests(Collector):
    """The per-request series, from the tallies, when scraped."""

    def __init__(self, tallies: dict[tuple[str, str, str], _Tally]) -> None:
        self._tallies = tallies

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "provider_router_requests", "Requests to /v1, by model, provider and outcome.", labels=("model", "provider", "outcome")
        )
        ttfb = HistogramMetricFamily("provider_router_ttfb_ms", "Time to first byte to the client (ms).", labels=("provider",))
        duration = HistogramMetricFamily("provider_router_duration_ms", "Request duration (ms).", labels=("provider",))
        by_provider: dict[str, _Tally] = {}
        for (model, provider, outcome), t in self._tallies.items():
            requests.add_metric((model, provider, outcome), t.requests)
            p = by_provider.setdefault(provider, _Tally())
            p.ttfb = [a + b for a, b in zip(p.ttfb, t.ttfb)]
            p.duration = [a + b for a, b in zip(p.duration, t.duration)]
            p.ttfb_sum += t.ttfb_sum
            p.duration_sum += t.duration_sum
        for provider, p in by_provider.items():
            ttfb.add_metric((provider,), _buckets(p.ttfb), p.ttfb_sum)
            duration.add_metric((provider,), _buckets(p.duration), p.duration_sum)
        yield from (requests, ttfb, duration)


class _Queue(Collector):
    """Time upstream calls waited for a connection slot (`max_connections`), per provider."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}

    def observe(self, provider: str, ms: float) -> None:
        counts = self.counts.get(provider)
        if counts is None:
            counts = self.counts[provider] = [0] * (len(_BUCKETS_MS) + 1)
            self.sums[provider] = 0.0
        counts[bisect_left(_BUCKETS_MS, ms) if ms > 0 else 0] += 1
        self.sums[provider] += ms

    def collect(self) -> Iterator[Metric]:
        h = HistogramMetricFamily(
            "provider_router_upstream_queue_ms", "Time upstream calls waited for a connection slot (ms).", labels=("provider",)
        )
        for provider, counts in self.counts.items():
            h.add_metric((provider,), _buckets(counts), self.sums[provider])
        yield h


class Metrics:
    """`observe(record)` once per finished /v1 request; `render()` for `GET /metrics`.

    prometheus-client's own Counter and Histogram take a lock, walk the buckets in Python
    and resolve label children on every observation (~25 us a request here); this keeps
    plain counts per series and lets the library build and format them only when scraped.
    """

    def __init__(self, state: State) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._tallies: dict[tuple[str, str, str], _Tally] = {}
        self._labels: dict[tuple[str | None, str | None, str | None], tuple[str, str, str]] = {}
        self.registry.register(_Requests(self._tallies))
        self.registry.register(_Live(state))
        self._queue = _Queue()
        self.registry.register(self._queue)
        self.observe_queue = self._queue.observe  # (provider, ms), once per upstream call
        self._models: set[str] = set()

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
        raw = (rec.model, rec.provider, rec.outcome)
        key = self._labels.get(raw)
        if key is None:
            key = (self._model_label(rec), rec.provider or "none", rec.outcome or "none")
            if len(self._labels) < 4 * MAX_MODELS:
                self._labels[raw] = key
        t = self._tallies.get(key)
        if t is None:
            t = self._tallies[key] = _Tally()
        t.requests += 1
        if rec.ttfb_ms is not None:
            t.ttfb[bisect_left(_BUCKETS_MS, rec.ttfb_ms)] += 1
            t.ttfb_sum += rec.ttfb_ms
        if rec.duration_ms is not None:
            t.duration[bisect_left(_BUCKETS_MS, rec.duration_ms)] += 1
            t.duration_sum += rec.duration_ms

    def render(self) -> bytes:
        return generate_latest(self.registry)
