"""Prometheus metrics: request counters and latency histograms observed per request, and
gauges (sessions, log queue) read from the live state at scrape time; the sessions' series
from the database (`session_reads.lifecycle`), so their counters survive restarts.

One registry per app, so several apps in one process (tests) never share series.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Protocol

from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from .providers import Provider
    from .records import RequestRecord
    from .store.watch import LogWatch
    from .store.writer import LogWriter

# Milliseconds: proxies are judged on single-digit ms overhead, LLM replies take seconds.
_BUCKETS_MS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000)
_LE = tuple(floatToGoString(b) for b in _BUCKETS_MS) + ("+Inf",)

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
    def watch(self) -> LogWatch | None: ...
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
            if "file" in s:  # a SQLite file's
                yield GaugeMetricFamily(
                    "provider_router_database_file_ok", "1 while the file at the configured path is the one opened.", value=1.0 if s["file"] == "ok" else 0.0
                )
                yield CounterMetricFamily("provider_router_database_reopened", "Times the database path was reopened.", value=s["reopened"])
            yield CounterMetricFamily(
                "provider_router_log_records_lost", "Records committed into a database file no longer at the path.", value=watch.lost
            )


class _Histogram:
    """One histogram series: a count per bucket (not cumulative; the last is +Inf) and the sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0.0] * len(_LE)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # The first bucket whose bound is at least `value`, as prometheus_client's Histogram picks it.
        self.counts[bisect_left(_BUCKETS_MS, value)] += 1.0
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out, acc = [], 0.0
        for le, n in zip(_LE, self.counts):
            acc += n
            out.append((le, acc))
        return out


class _Observed(Collector):
    """The per-request series, counted in plain numbers on the event loop and rendered by
    prometheus_client when scraped. Its Counter and Histogram take a lock and walk their
    buckets in Python on every observation, four times per request; the text is the same."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], float] = {}  # (model, provider, outcome) -> count
        self.ttfb: dict[str, _Histogram] = {}  # by provider
        self.duration: dict[str, _Histogram] = {}
        self.queue: dict[str, _Histogram] = {}

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "provider_router_requests", "Requests to /v1, by model, provider and outcome.", labels=("model", "provider", "outcome")
        )
        for labels, n in self.requests.items():
            requests.add_metric(labels, n)
        yield requests
        for name, what, series in (
            ("provider_router_ttfb_ms", "Time to first byte to the client (ms).", self.ttfb),
            ("provider_router_duration_ms", "Request duration (ms).", self.duration),
            ("provider_router_upstream_queue_ms", "Time upstream calls waited for a connection slot (ms).", self.queue),
        ):
            family = HistogramMetricFamily(name, what, labels=("provider",))
            for provider, h in series.items():
                family.add_metric((provider,), h.buckets(), h.sum)
            yield family


class Metrics:
    """`observe(record)` once per finished /v1 request, `observe_queue(provider, ms)` once per
    upstream call; `render()` for `GET /metrics`."""

    def __init__(self, state: Sources) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self._observed = _Observed()
        r.register(self._observed)
        self._live = _Live(state)
        r.register(self._live)
        # A record's (model, provider, outcome) -> its series: the label values worked out
        # once per distinct triple, not once per request.
        self._series: dict[tuple[str | None, str | None, str | None], tuple[tuple[str, str, str], _Histogram, _Histogram]] = {}
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
            o = self._observed
            series = (
                (self._model_label(rec), provider, rec.outcome or "none"),
                o.ttfb.setdefault(provider, _Histogram()),
                o.duration.setdefault(provider, _Histogram()),
            )
            if len(self._series) < 4 * MAX_MODELS:
                self._series[raw] = series
        labels, ttfb, duration = series
        requests = self._observed.requests
        requests[labels] = requests.get(labels, 0.0) + 1.0
        if rec.ttfb_ms is not None:
            ttfb.observe(rec.ttfb_ms)
        if rec.duration_ms is not None:
            duration.observe(rec.duration_ms)

    def observe_queue(self, provider: str, ms: float) -> None:
        h = self._observed.queue.get(provider)
        if h is None:
            h = self._observed.queue[provider] = _Histogram()
        h.observe(ms)

    def render(self, sessions: dict[str, Any] | None = None) -> bytes:
        """The scrape; `sessions` the lifecycle figures read from the database just before."""
        self._live.sessions = sessions  # no await until rendered: a concurrent scrape cannot interleave
        return generate_latest(self.registry)
