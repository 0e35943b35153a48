"""The dashboard's routes under `/ui` on the daemon's own listener: pages read through the
store's reads on the read-only connection (as the CLI and `/admin` do), the live rows as
server-sent events, the static files from the package. Without `auth.admin_key` none of
these routes exists, like the admin API.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from ..api.admin import bearer_ok
from ..api.ids import stamp
from ..errors import ApiError
from ..state import STATE, State
from ..store import queries, session_reads
from ..store import series as series_q
from ..store.reads import START, LogReads, is_cursor
from . import auth, conversation, views
from .html import Markup, href

PAGE_SIZE = views.PAGE_SIZE
MAX_PAGE = 500
LIVE_POLL_SECONDS = 1.0
LIVE_PING_SECONDS = 15.0
LIVE_MAX_ROWS = 200  # per poll: a page that fell behind skips to the newest
STATIC = {"ui.css": "text/css", "ui.js": "text/javascript", "favicon.svg": "image/svg+xml"}
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


@dataclass(slots=True)
class Ui:
    """What the dashboard keeps while the daemon runs: the login sessions, the static files
    (read once from the package), and the signal that ends live streams at shutdown."""

    logins: auth.Logins = field(default_factory=auth.Logins)
    guesses: auth.Guesses = field(default_factory=auth.Guesses)
    static: dict[str, bytes] = field(default_factory=dict)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)


UI = web.AppKey("ui", Ui)


# -- access ------------------------------------------------------------------------------
def _authed(request: web.Request) -> bool:
    state = request.app[STATE]
    key = state.config.auth.admin_key
    return bearer_ok(request.headers, key) or request.app[UI].logins.valid(request.cookies.get(auth.COOKIE))


class _Redirect(Exception):
    """Go to the login form (raised by `_gate`, answered by `_page`)."""


def _redirect(location: str, status: int = 303) -> web.Response:
    # A plain response: the edge middleware answers a raised HTTPException as an error.
    return web.Response(status=status, headers={"Location": location})


def _gate(request: web.Request) -> State:
    """The state, for a page only the admin may see; a browser without a login goes to the form."""
    if not _authed(request):
        raise _Redirect()
    return request.app[STATE]


def _page(handler: Any) -> Any:
    """A page handler whose visitor, when not logged in, is sent to the login form and back."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)  # type: ignore[no-any-return]
        except _Redirect:
            return _redirect(href("/ui/login", next=request.path_qs))

    wrapped.__doc__ = handler.__doc__
    return wrapped


def _reads(state: State) -> LogReads:
    if state.reads is None:
        raise ApiError(503, "The database is not open.", code="database_unavailable")
    return state.reads


def _html(state: State, markup: Markup, status: int = 200) -> web.Response:
    # The log is redacted as it is written; this also hides a secret configured since.
    return web.Response(status=status, text=state.redactor(markup), content_type="text/html", charset="utf-8")


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: every /ui response, errors included, carries the CSP and is kept
    out of caches (pages hold prompts); the static files may be cached."""
    if request.path != "/ui" and not request.path.startswith("/ui/"):
        return
    h = response.headers
    h["Content-Security-Policy"] = CSP
    h["X-Content-Type-Options"] = "nosniff"
    h["X-Frame-Options"] = "DENY"
    # Not `no-referrer`: a browser then sends `Origin: null` on the login form's POST.
    h["Referrer-Policy"] = "same-origin"
    h["Cross-Origin-Opener-Policy"] = "same-origin"
    h.setdefault("Cache-Control", "no-store")


def _safe_next(target: str | None) -> str:
    """Where to go after logging in: a dashboard path only (never another site)."""
    if not target or not target.startswith("/ui") or target.startswith("//") or "\\" in target or "//" in target.split("?")[0]:
        return "/ui/"
    return target


# -- login -------------------------------------------------------------------------------
async def login_form(request: web.Request) -> web.Response:
    state = request.app[STATE]
    target = _safe_next(request.query.get("next"))
    if _authed(request):
        return _redirect(target)
    return _html(state, views.login_page(target, failed=False))


async def login(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not auth.same_origin(request):
        raise ApiError(403, "Cross-site form submission refused.", code="cross_site")
    guesses, address = request.app[UI].guesses, request.remote or ""
    form = await request.post()
    typed, target = form.get("key"), _safe_next(str(form.get("next") or ""))
    wait = math.ceil(guesses.wait(address))
    if wait:  # the right key too: a guesser must not learn when it found it
        response = _html(state, views.login_page(target, failed=True, wait_s=wait), status=429)
        response.headers["Retry-After"] = str(wait)
        return response
    if not isinstance(typed, str) or not auth.key_ok(typed, state.config.auth.admin_key):
        guesses.failed(address)
        return _html(state, views.login_page(target, failed=True), status=401)
    response = _redirect(target)
    auth.set_cookie(response, request.app[UI].logins.create(), secure=request.secure)
    return response


async def logout(request: web.Request) -> web.Response:
    if not auth.same_origin(request):
        raise ApiError(403, "Cross-site form submission refused.", code="cross_site")
    request.app[UI].logins.drop(request.cookies.get(auth.COOKIE))
    response = _redirect("/ui/login")
    auth.clear_cookie(response)
    return response


# -- pages -------------------------------------------------------------------------------
def _int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"`{name}` must be an integer.", param=name) from None
    return min(max(value, lo), hi)


def _filter(request: web.Request) -> tuple[queries.RequestFilter, dict[str, str], list[str]]:
    """The list's filter from the query string, its time range as typed (`since`, `until`:
    `1h` ago, a date), and what could not be read (those fields are left out of the filter
    and the page says why, the form as typed)."""
    q = request.query
    when = {name: q.get(name, "").strip() for name in ("since", "until")}
    cuts: dict[str, str | None] = {}
    errors = []
    for name, typed in when.items():
        try:
            cuts[name] = queries.cutoff(typed) if typed else None
        except ValueError:
            cuts[name] = None
            errors.append(f"{name.capitalize()} must be a duration ago (30m, 1h, 2d) or an ISO date/time.")
    try:
        status = _int(request, "status", 0, 0, 999) or None
    except ApiError as e:
        status = None
        errors.append(f"Status {e.message.removeprefix('`status` ')}")

    def text(name: str) -> str | None:
        return q.get(name, "").strip() or None

    flt = queries.RequestFilter(
        model=text("model"), provider=text("provider"), client=text("client"), status=status,
        outcome=text("outcome"), query=text("q"), since=cuts["since"], until=cuts["until"], before=text("before"),
    )  # fmt: skip
    return flt, when, errors


async def requests_page(request: web.Request) -> web.Response:
    state = _gate(request)
    reads = _reads(state)
    flt, when, errors = _filter(request)
    limit = _int(request, "limit", PAGE_SIZE, 1, MAX_PAGE)
    if errors:  # the form again, as typed, saying what to fix; no rows from a filter half read
        facets = await reads.facets()
        page = views.requests_page([], flt, when, limit=limit, facets=facets, live=None, errors=errors, typed=dict(request.query))
        return _html(state, page, status=400)
    found = await reads.recent_requests(flt, limit=limit)
    rows = list(reversed(found.rows))
    live = None
    # The first page follows new rows; older pages stay still, and so does a search (its
    # full-text match, polled every second, can be the costly read: see bench/README.md).
    if not flt.before and not flt.query:
        live = href("/ui/events", after=found.cursor, **{k: v for k, v in request.query.items() if k not in ("before", "limit")})
    facets = await reads.facets()
    return _html(state, views.requests_page(rows, flt, when, limit=limit, facets=facets, live=live))


async def _one_request(request: web.Request, state: State) -> dict[str, Any] | None:
    try:
        return await _reads(state).get_request(request.match_info["id"])
    except queries.AmbiguousId as e:
        raise ApiError(400, str(e), code="ambiguous_id") from None


async def request_page(request: web.Request) -> web.Response:
    state = _gate(request)
    row = await _one_request(request, state)
    if row is None:
        return _html(state, views.error_page("Not found", "No request has this id."), status=404)
    return _html(state, conversation.request_page(row))


async def request_json(request: web.Request) -> web.Response:
    """The request as `logs show ID --json` prints it: row, request and response."""
    state = _gate(request)
    row = await _one_request(request, state)
    if row is None:
        raise ApiError(404, "No such request.", code="request_not_found")
    body = orjson.dumps(row, option=orjson.OPT_INDENT_2, default=str).decode()
    return web.Response(text=state.redactor(body), content_type="application/json")


async def sessions_page(request: web.Request) -> web.Response:
    state = _gate(request)
    which = request.query.get("state", "all")
    if which not in session_reads.STATES:
        which = "all"
    offset = _int(request, "offset", 0, 0, 10**9)
    rows = await _reads(state).list_sessions(state=which, limit=PAGE_SIZE + 1, offset=offset, newest_first=True)
    return _html(state, views.sessions_page(rows[:PAGE_SIZE], which, offset, PAGE_SIZE, len(rows) > PAGE_SIZE))


async def session_page(request: web.Request) -> web.Response:
    state = _gate(request)
    reads = _reads(state)
    try:
        s = await reads.get_session(request.match_info["id"])
    except queries.AmbiguousId as e:
        raise ApiError(400, str(e), code="ambiguous_id") from None
    sid = request.match_info["id"] if s is None else s["id"]
    tree = await reads.session_tree(sid)
    if s is None:
        if not tree.requests:
            return _html(state, views.error_page("Not found", "No session has this id."), status=404)
        # Requests name a session that has no row (a one-shot conversation stores none, and
        # an ended one may be deleted): its tree is still theirs.
        s = {"id": sid, "request_count": len(tree.requests)}
    return _html(state, conversation.session_page(s, tree))


async def stats_page(request: web.Request) -> web.Response:
    state = _gate(request)
    reads = _reads(state)
    rng = series_q.RANGES.get(request.query.get("range", "24h"), series_q.RANGES["24h"])
    ts = await reads.series(rng)
    st = await reads.stats(since=queries.cutoff(rng.name))
    return _html(state, views.stats_page(ts, st))


# -- live rows ---------------------------------------------------------------------------
async def events(request: web.Request) -> web.StreamResponse:
    """New rows of the list's filter as server-sent events (`rows`: a JSON list of rows as
    the table's cells, newest last; the event id is the last row's, so a reconnecting page
    resumes after it), polled from the read-only connection. Ends when the daemon stops."""
    if not _authed(request):
        raise ApiError(401, "The dashboard needs a login or `Authorization: Bearer <auth.admin_key>`.", code="invalid_admin_key")
    state = request.app[STATE]
    stopping = request.app[UI].stopping
    flt, _, errors = _filter(request)
    if errors:  # only the page's own (valid) filter reaches here
        raise ApiError(400, " ".join(errors), code="invalid_filter")
    flt.before = None
    after = _last_event_id(request) or request.query.get("after", "").strip() or START
    if not is_cursor(after):
        raise ApiError(400, "`after` must be a cursor the list's page gave.", param="after")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
    stamp(request, response, None)  # its head goes out here, not from the edge
    await response.prepare(request)
    await response.write(b"retry: 3000\n\n")
    idle = 0.0
    while not stopping.is_set() and not state.shutting_down:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), LIVE_POLL_SECONDS)
        if stopping.is_set() or state.reads is None:
            break
        page = await state.reads.new_requests(flt, after, limit=LIVE_MAX_ROWS)
        if page.rows:
            cells = [views.row_cells(r) for r in page.rows]
            data = state.redactor(orjson.dumps(cells).decode())
            await response.write(f"id: {page.cursor}\nevent: rows\ndata: {data}\n\n".encode())
            after, idle = page.cursor, 0.0
        else:
            idle += LIVE_POLL_SECONDS
            if idle >= LIVE_PING_SECONDS:  # a comment: finds a page that went away
                await response.write(b": ping\n\n")
                idle = 0.0
    return response


def _last_event_id(request: web.Request) -> str | None:
    """The cursor of the last rows a reconnecting page received, if it sent a valid one."""
    raw = request.headers.get("Last-Event-ID", "").strip()
    return raw if is_cursor(raw) else None


async def _stop_streams(app: web.Application) -> None:
    """`on_shutdown`: live streams end now, not at the end of the grace period."""
    app[UI].stopping.set()


# -- static files ------------------------------------------------------------------------
async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    body = request.app[UI].static.get(name)
    if body is None:
        raise web.HTTPNotFound()
    return web.Response(body=body, content_type=STATIC[name], headers={"Cache-Control": "max-age=300"})


async def root(request: web.Request) -> web.Response:
    """`/ui`, and `/ui/requests` (a single request is `/ui/requests/ID`): the list, its query kept."""
    return _redirect("/ui/" + (f"?{request.query_string}" if request.query_string else ""), 301)


def setup(app: web.Application) -> None:
    """Add the dashboard's routes to `app`, if an admin key is configured."""
    if not app[STATE].config.auth.admin_key:
        return  # no key, no dashboard: /ui answers as any unknown path
    files = resources.files(__package__).joinpath("static")
    app[UI] = Ui(static={name: files.joinpath(name).read_bytes() for name in STATIC})
    app.on_response_prepare.append(security_headers)
    app.on_shutdown.append(_stop_streams)
    r = app.router
    r.add_get("/ui", root)
    r.add_get("/ui/requests", root)
    r.add_get("/ui/", _page(requests_page))
    r.add_get("/ui/login", login_form)
    r.add_post("/ui/login", login)
    r.add_post("/ui/logout", logout)
    r.add_get("/ui/events", events)
    r.add_get("/ui/requests/{id}", _page(request_page))
    r.add_get("/ui/requests/{id}/json", _page(request_json))
    r.add_get("/ui/sessions", _page(sessions_page))
    r.add_get("/ui/sessions/{id}", _page(session_page))
    r.add_get("/ui/stats", _page(stats_page))
    r.add_get("/ui/static/{name}", static)
