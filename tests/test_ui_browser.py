"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright, against
a real daemon filled through the official SDK. One daemon and one browser for the module;
every page is checked for console errors (a CSP violation is one) and saved as a
screenshot in tests/.screenshots/ (not committed).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest
import yaml
from playwright import sync_api as playwright_api

from tests.daemon import WAIT, free_port
from tests.waiting import until_sync

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
SHOTS = Path(__file__).parent / ".screenshots"
ADMIN = "browser-admin-key-31"
EVIL = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">'
TOOL_HISTORY = [
    {"role": "user", "content": "weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_w1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}},
    ]},
    {"role": "tool", "tool_call_id": "call_w1", "content": "sunny, 21C"},
]  # fmt: skip

# Every test of the module on one pytest-xdist worker (`make test` runs --dist loadgroup):
# one daemon and one browser, not one per worker.
pytestmark = pytest.mark.xdist_group("browser")


def chromium() -> str:
    """Debian's chromium, installed with apt-get when missing (as root; otherwise say how)."""
    if Path(CHROMIUM).exists():
        return CHROMIUM
    if os.geteuid() != 0:
        pytest.fail(f"the browser tests need Debian's chromium at {CHROMIUM}: run `sudo apt-get install -y chromium`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True, env=env, stdout=subprocess.DEVNULL)
    assert Path(CHROMIUM).exists(), f"apt-get installed chromium but {CHROMIUM} is missing"
    return CHROMIUM


@dataclass
class Filled:
    """The daemon's URL and the requests and sessions the tests look for."""

    url: str
    db: Path
    ids: dict[str, str] = field(default_factory=dict)
    sdk: openai.OpenAI | None = None


def _ask(sdk: openai.OpenAI, messages: list[dict[str, Any]]) -> tuple[str, str | None, str]:
    raw = sdk.chat.completions.with_raw_response.create(model="echo", messages=messages)  # type: ignore[arg-type]
    reply = raw.parse().choices[0].message.content or ""
    return raw.headers["x-request-id"], raw.headers.get("x-session-id"), reply


FILLED = 10  # requests `_fill` makes


def _fill(sdk: openai.OpenAI) -> dict[str, str]:
    ids: dict[str, str] = {}
    for i in range(3):
        _ask(sdk, [{"role": "user", "content": f"warm-up question {i}"}])
    ids["aardvark"], _, _ = _ask(sdk, [{"role": "user", "content": "where does the aardvark live?"}])
    ids["tool"], _, _ = _ask(sdk, [*TOOL_HISTORY, {"role": "user", "content": "and tomorrow?"}])
    opening = [{"role": "user", "content": "tell me a story"}]
    _, _, reply = _ask(sdk, opening)
    for branch in ("with a happy ending", "with a sad ending"):
        ids[branch], ids["session"], _ = _ask(sdk, [*opening, {"role": "assistant", "content": reply}, {"role": "user", "content": branch}])  # type: ignore[assignment]
    evil = [{"role": "user", "content": EVIL}]
    _, _, reply = _ask(sdk, evil)
    ids["evil"], _, _ = _ask(sdk, [*evil, {"role": "assistant", "content": reply}, {"role": "user", "content": EVIL}])
    return ids


def _rows(db: Path) -> int:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return int(conn.execute("SELECT count(*) FROM requests").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.OperationalError:
        return -1


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Filled]:
    """A real `provider-router serve` with an admin key, filled through the official SDK."""
    tmp = tmp_path_factory.mktemp("ui-browser")
    port = free_port()
    cfg = tmp / "config.yaml"
    cfg.write_text(yaml.safe_dump({"providers": [{"name": "echo", "type": "echo"}], "models": [{"name": "echo", "provider": "echo"}], "auth": {"admin_key": ADMIN}}))
    db, log = tmp / "ui.db", tmp / "daemon.log"
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "provider_router", "serve", "--config", str(cfg), "--port", str(port), "--db", str(db)],
            stdout=subprocess.DEVNULL, stderr=out, cwd=tmp, env=env,
        )  # fmt: skip
    try:
        until_sync(lambda: proc.poll() is not None or b'"listening"' in log.read_bytes(), "the daemon to listen")
        assert proc.poll() is None, log.read_text()[-2000:]
        url = f"http://127.0.0.1:{port}"
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        ids = _fill(sdk)
        until_sync(lambda: _rows(db) >= FILLED, "the rows to be written")
        yield Filled(url, db, ids, sdk)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = chromium()
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@dataclass
class Tab:
    """A logged-in page, with the console errors it reported since the last check."""

    page: Any
    url: str
    errors: list[str] = field(default_factory=list)

    def open(self, path: str) -> Any:
        self.page.goto(self.url + path)
        return self.page

    def shot(self, name: str) -> None:
        SHOTS.mkdir(exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _watch(page: Any, errors: list[str]) -> None:
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))


def _log_in(page: Any, url: str) -> None:
    page.goto(url + "/ui/")
    page.fill("input[name=key]", ADMIN)
    page.click("form.login button[type=submit]")
    page.wait_for_selector("table#requests tbody tr td.time")


@pytest.fixture(scope="module")
def tab(browser: Any, daemon: Filled) -> Iterator[Tab]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    t = Tab(page, daemon.url)
    _watch(page, t.errors)
    _log_in(page, daemon.url)
    yield t
    context.close()


@pytest.fixture(autouse=True)
def _no_console_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    """No page a test opened reported a console error (a script error, a refused resource,
    a CSP violation)."""
    yield
    if "tab" in request.fixturenames:
        t: Tab = request.getfixturevalue("tab")
        errors, t.errors[:] = list(t.errors), []
        assert errors == []


def test_logging_in_shows_the_requests(browser: Any, daemon: Filled) -> None:
    """A fresh browser is sent to the login form; the admin key leads to the list, newest
    first, with every request the SDK made, and its live badge on."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = context.new_page()
        errors: list[str] = []
        _watch(page, errors)
        page.goto(daemon.url + "/ui/")
        assert "/ui/login" in page.url
        SHOTS.mkdir(exist_ok=True)
        page.screenshot(path=str(SHOTS / "login.png"))
        _log_in(page, daemon.url)
        page.wait_for_selector("#live[data-state=open]")
        assert page.locator("table#requests tbody tr").count() >= FILLED
        assert page.locator("table#requests tbody tr", has_text="where does the aardvark live?").count() == 1
        page.screenshot(path=str(SHOTS / "requests.png"), full_page=True)
        assert errors == []
    finally:
        context.close()


def test_search_finds_one_request(tab: Tab) -> None:
    """Typing a word into the search box and filtering leaves the one request with it."""
    page = tab.open("/ui/")
    page.fill("input[name=q]", "aardvark")
    page.click("form.filters button[type=submit]")
    page.wait_for_url("**q=aardvark**")
    rows = page.locator("table#requests tbody tr")
    assert rows.count() == 1 and "where does the aardvark live?" in rows.first.inner_text()
    tab.shot("search")


def test_a_request_page_shows_the_tool_call_and_its_arguments(tab: Tab, daemon: Filled) -> None:
    """The transcript shows the assistant's tool call by name with its arguments, and the
    tool's result under its call id."""
    page = tab.open(f"/ui/requests/{daemon.ids['tool']}")
    call = page.locator(".transcript .call")
    assert call.locator(".fn").inner_text() == "get_weather"
    assert json.loads(call.locator("pre.args").inner_text()) == {"city": "Paris", "unit": "C"}
    assert "sunny, 21C" in page.locator(".transcript .role-tool").inner_text()
    tab.shot("request")


def test_a_branching_session_shows_both_branches_side_by_side(tab: Tab, daemon: Filled) -> None:
    """The session's tree forks after the first reply into two branches drawn next to each
    other, each ending at the reply of its own request."""
    page = tab.open(f"/ui/sessions/{daemon.ids['session']}")
    fork = page.locator("table.tree tr", has=page.locator("td.lane + td.lane"))
    assert fork.count() == 2  # the two user messages, then the two replies
    left, right = fork.first.locator("td.lane").nth(0), fork.first.locator("td.lane").nth(1)
    assert "with a happy ending" in left.inner_text() and "with a sad ending" in right.inner_text()
    a, b = left.bounding_box(), right.bounding_box()
    assert a is not None and b is not None and a["x"] + a["width"] <= b["x"] and abs(a["y"] - b["y"]) < 1
    replies = fork.nth(1).locator("td.lane")
    assert replies.nth(0).locator(f'a[href="/ui/requests/{daemon.ids["with a happy ending"]}"]').count() == 1
    assert replies.nth(1).locator(f'a[href="/ui/requests/{daemon.ids["with a sad ending"]}"]').count() == 1
    tab.shot("session")


def test_a_prompt_with_a_script_shows_as_text_and_runs_nothing(tab: Tab, daemon: Filled) -> None:
    """A prompt holding a <script> and an onerror handler is shown as its text on the list
    and the request page, and neither ran."""
    for path in (f"/ui/requests/{daemon.ids['evil']}", "/ui/"):
        page = tab.open(path)
        assert page.get_by_text(EVIL, exact=False).count() >= 1
        assert page.evaluate("typeof window.pwned") == "undefined"
    tab.shot("escaped")


def test_new_requests_appear_live(tab: Tab, daemon: Filled) -> None:
    """With the list open, a request made through the SDK appears at the top by itself."""
    page = tab.open("/ui/")
    page.wait_for_selector("#live[data-state=open]")
    assert daemon.sdk is not None
    _ask(daemon.sdk, [{"role": "user", "content": "arriving live <b>bold?</b>"}])
    page.wait_for_selector("table#requests tbody tr.fresh >> text=arriving live <b>bold?</b>")
    assert "arriving live" in page.locator("table#requests tbody tr").first.inner_text()


def test_stats_draw_charts(tab: Tab) -> None:
    """The stats page draws its six charts over the hour with a line of requests."""
    page = tab.open("/ui/stats?range=1h")
    assert page.locator("svg.chart").count() == 6
    assert page.locator("svg.chart polyline").count() >= 1
    tab.shot("stats")


def test_screenshots_are_kept_outside_git() -> None:
    """The screenshots' folder is ignored by git (only docs/ holds the README's picture)."""
    if shutil.which("git") is None:
        pytest.skip("no git")
    out = subprocess.run(["git", "check-ignore", "-q", str(SHOTS / "x.png")], cwd=Path(__file__).parent, check=False)
    assert out.returncode == 0
