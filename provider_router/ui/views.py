"""The dashboard's pages as HTML (built with `html.el`, so every value is escaped): the
layout, the login form, the request list, the session list and the stats. A request and a
session's tree are in `conversation.py`. Pages take what the store's reads return.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Sequence

from ..rowtext import OUTCOMES, prompt_line
from ..store import series as series_q
from ..store.queries import RequestFilter
from ..store.stats import GroupStats, Stats
from . import charts, fmt
from .html import Markup, el, href, join, part, raw

SINCE_CHOICES = (("", "any time"), ("15m", "last 15 min"), ("1h", "last hour"), ("24h", "last 24 h"), ("7d", "last 7 days"), ("30d", "last 30 days"))
PAGE_SIZE = 50  # requests per page unless `limit` says
TOP_GROUPS = 7  # charts draw this many (model, provider) lines, the rest as one "other"


def page(title: str, *body: Any, nav: str = "", authed: bool = True) -> Markup:
    """A whole page: head (the stylesheet and the script, both files of the package), the
    navigation, and `body`."""
    links = [("requests", "/ui/", "Requests"), ("sessions", "/ui/sessions", "Sessions"), ("stats", "/ui/stats", "Stats")]
    menu = [el("a", text, href=url, class_="current" if key == nav else None) for key, url, text in links] if authed else []
    logout = (
        el("form", el("button", "Log out", type="submit"), method="post", action="/ui/logout", class_="logout") if authed else None
    )
    doc = el(
        "html",
        el(
            "head",
            el("meta", charset="utf-8"),
            el("meta", name="viewport", content="width=device-width, initial-scale=1"),
            el("title", f"{title} · provider-router"),
            el("link", rel="stylesheet", href="/ui/static/ui.css"),
            el("link", rel="icon", href="/ui/static/favicon.svg", type="image/svg+xml"),
            el("script", src="/ui/static/ui.js", defer=True),
        ),
        el(
            "body",
            el("header", el("a", "provider-router", href="/ui/", class_="brand"), el("nav", menu), logout),
            el("main", body),
        ),
        lang="en",
    )
    return raw("<!doctype html>\n") + doc


def error_page(title: str, message: str, authed: bool = True) -> Markup:
    return page(title, el("h1", title), el("p", message), authed=authed)


def login_page(next_url: str, failed: bool, wait_s: int = 0) -> Markup:
    form = el(
        "form",
        el("label", "Admin key", el("input", type="password", name="key", autocomplete="current-password", required=True, autofocus=True)),
        el("input", type="hidden", name="next", value=next_url),
        el("button", "Log in", type="submit"),
        method="post",
        action="/ui/login",
        class_="login",
    )
    note = el("p", "That is not the admin key.", class_="error", role="alert") if failed else None
    if wait_s:
        note = el("p", f"Too many wrong keys from here: try again in {wait_s} s.", class_="error", role="alert")
    hint = el("p", "The key is ", el("code", "auth.admin_key"), " in the daemon's config.", class_="muted")
    return page("Log in", el("h1", "Log in"), note, form, hint, authed=False)


# -- requests --------------------------------------------------------------------------
def request_href(request_id: str) -> str:
    return href(f"/ui/requests/{part(request_id)}")


def session_href(session_id: str) -> str:
    return href(f"/ui/sessions/{part(session_id)}")


def row_cells(row: dict[str, Any]) -> list[dict[str, str]]:
    """One listed request as the table's cells (text, class, link, tooltip): the same for
    the page and for the rows the live stream pushes, which the script only places as text."""
    ok = row.get("outcome") in (None, "ok")
    prompt, reply = prompt_line(row, 160), fmt.first_line(row.get("response_text"), 160)
    if not reply and row.get("error") and not ok:
        reply = fmt.first_line(str(row["error"]), 160)
    cells = [
        {"text": fmt.local_time(row.get("received_at")), "href": request_href(row["id"]), "title": row["id"], "class": "time"},
        {"text": row.get("model") or "-", "class": "model", "title": row.get("model")},
        {"text": row.get("provider") or "-"},
        {"text": fmt.status(row), "class": "status" if ok else "status bad"},
        {"text": fmt.ms(row.get("ttfb_ms")), "class": "num"},
        {"text": fmt.ms(row.get("duration_ms")), "class": "num"},
        {"text": fmt.tokens(row), "class": "num"},
        {"text": prompt, "class": "text"},
        {"text": reply, "class": "text"},
    ]
    return cells


def _row(row: dict[str, Any]) -> Markup:
    tds = []
    for c in row_cells(row):
        text: Any = el("a", c["text"], href=c["href"]) if c.get("href") else c["text"]
        tds.append(el("td", text, class_=c.get("class"), title=c.get("title")))
    return el("tr", tds)


REQUEST_HEADERS = ("Time", "Model", "Provider", "Status", "TTFB", "Duration", "Tokens", "Prompt", "Reply")


def _filters(flt: RequestFilter, when: dict[str, str], facets: dict[str, list[str]], typed: dict[str, str] | None = None) -> Markup:
    def text(name: str, label: str, value: Any, options: Sequence[str] = (), **kw: Any) -> Markup:
        datalist = f"{name}-options" if options else None
        return el(
            "label", label,
            el("input", name=name, value="" if value is None else str(value), list=datalist, **kw),
            el("datalist", [el("option", value=o) for o in options], id=datalist) if options else None,
        )  # fmt: skip

    outcome = el(
        "label", "Outcome",
        el("select", el("option", "any", value=""), [el("option", o, value=o, selected=o == flt.outcome) for o in OUTCOMES], name="outcome"),
    )  # fmt: skip
    since = when.get("since", "")
    choices = list(SINCE_CHOICES)
    if since and since not in dict(choices):
        choices.append((since, since))
    start = el("label", "Time", el("select", [el("option", t, value=v, selected=v == since) for v, t in choices], name="since"))
    until = text("until", "Until", when.get("until") or None, placeholder="now", size=10, title="before then: 1h (ago) or 2026-12-01T12:00")
    return el(
        "form",
        text("q", "Search", flt.query, type="search", placeholder="words in prompts and replies"),
        text("model", "Model", flt.model, facets.get("model", ()), placeholder="gpt-* works"),
        text("provider", "Provider", flt.provider, facets.get("provider", ())),
        text("client", "Client", flt.client, facets.get("client", ())),
        text("status", "Status", typed.get("status") if typed else flt.status, inputmode="numeric", size=4),
        outcome,
        start,
        until,
        el("button", "Filter", type="submit"),
        el("a", "Clear", href="/ui/"),
        method="get",
        action="/ui/",
        class_="filters",
    )


def requests_page(
    rows: list[dict[str, Any]], flt: RequestFilter, when: dict[str, str], *, limit: int, facets: dict[str, list[str]], live: str | None,
    errors: Sequence[str] = (), typed: dict[str, str] | None = None,
) -> Markup:
    """The request list, newest first; `live`: the event stream's URL on the first page;
    `errors`: what in the filter could not be read (`typed`: the form as it was sent)."""
    query = {
        "q": flt.query, "model": flt.model, "provider": flt.provider, "client": flt.client, "status": flt.status,
        "outcome": flt.outcome, "since": when.get("since"), "until": when.get("until"), "limit": None if limit == PAGE_SIZE else limit,
    }  # fmt: skip
    pager = []
    if flt.before:
        pager.append(el("a", "← Newest", href=href("/ui/", **query)))
    if len(rows) == limit:
        pager.append(el("a", "Older →", href=href("/ui/", **query, before=rows[-1]["id"]), rel="next"))
    empty = el("tr", el("td", "No requests match.", colspan=len(REQUEST_HEADERS)), id="empty") if not rows else None
    table = el(
        "table",
        el("thead", el("tr", [el("th", h) for h in REQUEST_HEADERS])),
        el("tbody", empty, [_row(r) for r in rows]),
        id="requests",
        class_="requests",
        data_live=live,
    )
    heading = el("h1", "Requests", el("span", "", id="live", class_="live") if live else None)
    if errors:
        notes = [el("p", e, class_="error", role="alert") for e in errors]
        return page("Requests", heading, _filters(flt, when, facets, typed), notes, nav="requests")
    return page("Requests", heading, _filters(flt, when, facets), el("div", table, class_="scroll"), el("nav", pager, class_="pager"), nav="requests")


# -- sessions --------------------------------------------------------------------------
def sessions_page(rows: list[dict[str, Any]], state: str, offset: int, limit: int, has_more: bool) -> Markup:
    tabs = el("nav", [el("a", s, href=href("/ui/sessions", state=s), class_="current" if s == state else None) for s in ("all", "active", "expired")], class_="tabs")
    head = ("Session", "State", "Client", "Route", "Requests", "Messages", "Created", "Last used")
    body = [
        el(
            "tr",
            el("td", el("a", s["id"][:16], href=session_href(s["id"]), title=s["id"]), class_="time"),
            el("td", s.get("state") or "-"),
            el("td", s.get("client") or "-"),
            el("td", f"{s.get('provider') or '-'}/{s.get('upstream_model') or '-'}"),
            el("td", s.get("request_count"), class_="num"),
            el("td", s.get("message_count"), class_="num"),
            el("td", fmt.local_time(s.get("created_at"))),
            el("td", fmt.local_time(s.get("last_accessed_at"))),
        )
        for s in rows
    ]
    if not rows:
        body = [el("tr", el("td", "No sessions.", colspan=len(head)))]
    pager = []
    if offset:
        pager.append(el("a", "← Newer", href=href("/ui/sessions", state=state, offset=max(0, offset - limit) or None)))
    if has_more:
        pager.append(el("a", "Older →", href=href("/ui/sessions", state=state, offset=offset + limit), rel="next"))
    table = el("table", el("thead", el("tr", [el("th", h) for h in head])), el("tbody", body), class_="requests")
    return page("Sessions", el("h1", "Sessions"), tabs, table, el("nav", pager, class_="pager"), nav="sessions")


# -- stats -----------------------------------------------------------------------------
def _group_name(model: str | None, provider: str | None) -> str:
    return f"{model or '-'} / {provider or '-'}"


def _axis_label(rng: series_q.Range) -> Any:
    fmt_ = "%H:%M" if rng.seconds <= 86400 else "%m-%d %H:%M" if rng.span != "d" else "%Y-%m-%d"
    return lambda when: when.astimezone().strftime(fmt_)


def _per_group(ts: series_q.TimeSeries, value: Any) -> list[tuple[str, list[float | None]]]:
    """One series per (model, provider), the busiest first; past `TOP_GROUPS`, the rest added
    up as "other" (for counts; latencies of the rest are left out)."""
    ranked = sorted(ts.groups.items(), key=lambda kv: -sum(g.requests for g in kv[1] if g is not None))
    return [(_group_name(*key), [None if g is None else value(g) for g in points]) for key, points in ranked[:TOP_GROUPS]]


def _summed(ts: series_q.TimeSeries, value: Any) -> list[tuple[str, list[float | None]]]:
    out = _per_group(ts, value)
    rest = sorted(ts.groups.items(), key=lambda kv: -sum(g.requests for g in kv[1] if g is not None))[TOP_GROUPS:]
    if rest:
        other = [sum(value(points[i]) for _, points in rest if points[i] is not None) for i in range(len(ts.starts))]
        out.append(("other", other))  # type: ignore[arg-type]
    # Counts are 0, not missing, where a group had no request in a bucket.
    return [(name, [0.0 if v is None else v for v in values]) for name, values in out]


def _summary(st: Stats) -> Markup:
    head = ("Model", "Provider", "Requests", "Errors", "Tokens in", "Tokens out", "Cached", "TTFB p50", "TTFB p95", "Duration p50", "Duration p95")

    def cells(g: GroupStats, model: str, provider: str) -> Markup:
        values = (g.requests, g.errors, g.prompt_tokens, g.completion_tokens, g.cached_tokens)
        times = (g.ttfb_p50_ms, g.ttfb_p95_ms, g.duration_p50_ms, g.duration_p95_ms)
        return join([el("td", model), el("td", provider), [el("td", f"{v:,}", class_="num") for v in values], [el("td", fmt.ms(t), class_="num") for t in times]])

    rows = [el("tr", cells(g, g.model or "-", g.provider or "-")) for g in st.groups]
    rows.append(el("tr", cells(st.total, "total", ""), class_="total"))
    return el("table", el("thead", el("tr", [el("th", h) for h in head])), el("tbody", rows), class_="requests")


def stats_page(ts: series_q.TimeSeries, st: Stats) -> Markup:
    """Charts over the range from the roll-ups, then the range's totals (what `stats` prints)."""
    rng = ts.range
    picker = el("nav", [el("a", name, href=href("/ui/stats", range=name), class_="current" if name == rng.name else None) for name in series_q.RANGES], class_="tabs")
    label = _axis_label(rng)
    step = int(rng.step.total_seconds() // 60)
    per = f"per {step} min" if step < 60 else f"per {step // 60} h" if step < 1440 else f"per {step // 1440} d"
    total = ts.total
    figures = [
        charts.line_chart(f"Requests {per}", ts.starts, _summed(ts, lambda g: g.requests), label=label),
        charts.line_chart(f"Errors {per}", ts.starts, _summed(ts, lambda g: g.errors), label=label),
        charts.line_chart(f"Tokens (in + out) {per}", ts.starts, _summed(ts, lambda g: g.tokens), label=label),
        charts.line_chart(
            "Time to first byte, all models", ts.starts,
            [("p50", [g.ttfb(0.5) for g in total]), ("p95", [g.ttfb(0.95) for g in total])], unit="ms", label=label,
        ),
        charts.line_chart(
            "Duration, all models", ts.starts,
            [("p50", [g.duration(0.5) for g in total]), ("p95", [g.duration(0.95) for g in total])], unit="ms", label=label,
        ),
        charts.line_chart("Duration p95 by model", ts.starts, _per_group(ts, lambda g: g.duration(0.95)), unit="ms", label=label),
    ]  # fmt: skip
    now = datetime.now().astimezone()
    note = el(
        "p",
        f"Last {rng.name} to {now.strftime('%H:%M')} local time, {per}, from the per-minute roll-ups; "
        "percentiles are estimated from latency histogram buckets.",
        class_="muted",
    )
    sessions = st.sessions
    counts = el("p", f"Sessions used in the range: {sessions['active']} active, {sessions['expired']} expired, {sessions['total']} in all.")
    return page(
        "Stats", el("h1", "Stats"), picker, note, el("div", figures, class_="charts"), el("h2", f"Totals, last {rng.name}"), _summary(st), counts, nav="stats"
    )
