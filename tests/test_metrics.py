"""The per-request series of /metrics (requests by model, provider and outcome; time to first
byte, duration and upstream queue histograms by provider) render as prometheus_client's own
Counter and Histogram render the same observations."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from provider_router.metrics import _BUCKETS_MS, Metrics
from provider_router.records import RequestRecord

names = st.one_of(st.none(), st.sampled_from(["gpt-4o", "llama3", 'quo"te\\ and\nnewline']))
ms = st.one_of(st.none(), st.sampled_from([0.0, *_BUCKETS_MS]), st.floats(0, 10 * _BUCKETS_MS[-1], allow_nan=False))
records = st.lists(st.tuples(names, st.sampled_from([None, "up", "echo"]), st.sampled_from([None, "ok", "rejected"]), ms, ms), max_size=40)
queue = st.lists(st.tuples(st.sampled_from(["up", "echo"]), st.floats(0, 1e5, allow_nan=False)), max_size=10)


class _NoSources:
    writer = watch = None
    providers: dict[str, Any] = {}


def _reference(observed: list[tuple[Any, ...]], waits: list[tuple[str, float]]) -> bytes:
    r = CollectorRegistry()
    requests = Counter("provider_router_requests", "Requests to /v1, by model, provider and outcome.", ("model", "provider", "outcome"), registry=r)
    ttfb = Histogram("provider_router_ttfb_ms", "Time to first byte to the client (ms).", ("provider",), buckets=_BUCKETS_MS, registry=r)
    duration = Histogram("provider_router_duration_ms", "Request duration (ms).", ("provider",), buckets=_BUCKETS_MS, registry=r)
    queued = Histogram(
        "provider_router_upstream_queue_ms", "Time upstream calls waited for a connection slot (ms).", ("provider",), buckets=_BUCKETS_MS, registry=r
    )
    for model, provider, outcome, t, d in observed:
        requests.labels(model if model is not None and provider is not None else "none", provider or "none", outcome or "none").inc()
        for h, v in ((ttfb, t), (duration, d)):
            child = h.labels(provider or "none")
            if v is not None:
                child.observe(v)
    for provider, v in waits:
        queued.labels(provider).observe(v)
    return generate_latest(r)


@settings(max_examples=200, deadline=None)
@given(records, queue)
def test_request_series_render_as_prometheus_clients_own(observed: list[tuple[Any, ...]], waits: list[tuple[str, float]]) -> None:
    """Same observations, same text: series in first-seen order, cumulative buckets with the
    library's `le` spelling, `_count` and `_sum`, label values escaped."""
    m = Metrics(_NoSources())
    for model, provider, outcome, t, d in observed:
        rec = RequestRecord("POST", "/v1/chat/completions", model=model, provider=provider, outcome=outcome, ttfb_ms=t, duration_ms=d)
        m.observe(rec)
    for provider, v in waits:
        m.observe_queue(provider, v)
    assert m.render() == _reference(observed, waits)
