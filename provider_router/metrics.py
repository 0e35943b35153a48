"""Prometheus metrics: request counters and latency histograms observed per request, and
gauges (sessions, log queue) read from the live state at scrape time; the sessions' series
from the database (`session_reads.lifecycle`), so their counters survive restarts.

One registry per app, so several apps in one process (tests) never share series.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Mapping, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .providers import Provider
    from .records import RequestRecord
    from .store.watch import DbWatch
    from .store.writer import LogWriter

# Milliseconds: proxies are judged on single-digit ms overhead, LLM replies take seconds.
_BUCKETS_MS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_MODELS = 200

# Without this every counter and histogram series gains a `_created` twin: twice the lines
# per scrape, which no dashboard here reads. The switch is the library's own and process-wide.
disable_created_metrics()


class Sources(Protocol):
    """What the live series are read from when scraped (the app's state): read anew each
    time, since the writer and the watch are replaced when the database is reopened."""

    @property
    def writer(self) -> LogWriter | None: ...
    @property
    def watch(self) -> DbWatch | None: ...
    @property
    def providers(self) -> Mapping[str, Provider]: ...


class _Live(Collector):
    """Series read when scraped from what keeps them: the sessions' figures, the log writer (its counts
    come from its own process) and the database watch. Their counters are totals kept there,
    which prometheus_client's Counter (it only increments) cannot mirror."""

    def __init__(self, state: Sources) -> None:
        self._state = state
        self.sessions: dict[str, Any] | None = None  # set just before each render

    def collect(self) -> Iterator[Metric]:
        writer, st = self._state.writer, self.sessions
        if st is not None:
            yield GaugeMetricFamily("provider_router_sessions_active", "Active sessions.", value=st["active"])
            yield CounterMetricFamily("provider_router_sessions_created", "Sessions created.", value=st["created"])
            yield CounterMetricFamily("provider_router_sessions_expired", "Sessions expired (idle past their timeout).", value=st["expired"])
            yield CounterMetricFamily("provider_router_sessions_evicted", "Sessions evicted (max_sessions).", value=st["evicted"])
            yield CounterMetricFamily("provider_router_sessions_deleted", "Sessions deleted (client, admin, CLI).", value=st["deleted"])
            for name, key, what in (
                ("provider_router_session_oldest_age_seconds", "oldest_age_seconds", "Age of the oldest active session."),
                ("provider_router_session_newest_age_seconds", "newest_age_seconds", "Age of the newest active session."),
                ("provider_router_session_duration_seconds_average", "average_duration_seconds", "Average session duration, first to last request."),
                ("provider_router_session_requests_average", "requests_per_session", "Average requests per session."),
            ):
                yield GaugeMetricFamily(name, what, value=st[key] or 0)
        ups = [(name, p.upstream) for name, p in self._state.providers.items() if p.upstream is not None]
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


class Metrics:
    """`observe(record)` once per finished /v1 request, `observe_queue(provider, ms)` once per
    upstream call; `render()` for `GET /metrics`."""

    def __init__(self, state: Sources) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            "provider_router_requests", "Requests to /v1, by model, provider and outcome.", ("model", "provider", "outcome"), registry=r
        )
        self._ttfb = Histogram("provider_router_ttfb_ms", "Time to first byte to the client (ms).", ("provider",), buckets=_BUCKETS_MS, registry=r)
        self._duration = Histogram("provider_router_duration_ms", "Request duration (ms).", ("provider",), buckets=_BUCKETS_MS, registry=r)
        self._queue = Histogram(
            "provider_router_upstream_queue_ms", "Time upstream calls waited for a connection slot (ms).", ("provider",), buckets=_BUCKETS_MS, registry=r
        )
        self._live = _Live(state)
        r.register(self._live)
        # Resolving a label child takes the metric's lock and checks the label values: once
        # per distinct (model, provider, outcome) a record carries, not once per request.
        self._series: dict[tuple[str | None, str | None, str | None], tuple[Counter, Histogram, Histogram]] = {}
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
        series = self._series.get(raw)
        if series is None:
            provider = rec.provider or "none"
            series = (
                self._requests.labels(self._model_label(rec), provider, rec.outcome or "none"),
                self._ttfb.labels(provider),
                self._duration.labels(provider),
            )
            if len(self._series) < 4 * MAX_MODELS:
                self._series[raw] = series
        requests, ttfb, duration = series
        requests.inc()
        if rec.ttfb_ms is not None:
            ttfb.observe(rec.ttfb_ms)
        if rec.duration_ms is not None:
            duration.observe(rec.duration_ms)

    def observe_queue(self, provider: str, ms: float) -> None:
        self._queue.labels(provider).observe(ms)

    def render(self, sessions: dict[str, Any] | None = None) -> bytes:
        """The scrape; `sessions` the lifecycle figures read from the database just before."""
        self._live.sessions = sessions  # no await until rendered: a concurrent scrape cannot interleave
        return generate_latest(self.registry)
