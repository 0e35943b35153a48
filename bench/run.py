"""One-shot benchmark of provider-router: starts a fake OpenAI upstream, a bare aiohttp
pass-through (the floor) and the real proxy, measures all three in the same run, and prints
one markdown table of medians and ratios (also written to bench/results/latest.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import math
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
CHAT_PATH = "/v1/chat/completions"
API_KEY = "bench-key"
ADMIN_KEY = "bench-admin"  # lets run.py read the proxy's /metrics (log queue, drops)
MESSAGES = [{"role": "user", "content": "Say hello in five words."}]
BODY_PLAIN = json.dumps({"model": "bench-model", "messages": MESSAGES, "stream": False})
BODY_STREAM = json.dumps({"model": "bench-model", "messages": MESSAGES, "stream": True})
HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
FAKE_CONTENT = "Hello from the fake upstream."
STREAM_EVENTS_MIN = 65  # 64 chunks + the usage chunk, then [DONE]
TARGETS = ("direct", "passthrough", "proxy")
LABELS = {"direct": "direct", "passthrough": "pass-through", "proxy": "proxy"}
READY_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0
MIB = 1024 * 1024


# ---------------------------------------------------------------- settings and results


@dataclass(frozen=True)
class Settings:
    quick: bool
    reps: int
    duration_s: int
    concurrency: int
    requests: int
    stream_requests: int
    stream_concurrency: int
    stream_gap_ms: float
    mix_stream_every: int
    only: tuple[str, ...]
    python: str
    output: Path
    keep_tmp: bool


@dataclass
class Row:
    """One line of the table; cells are preformatted strings ("" renders as blank)."""

    metric: str
    direct: str = ""
    passthrough: str = ""
    proxy: str = ""
    vs_direct: str = ""
    vs_passthrough: str = ""
    target: str = ""
    met: str = ""


@dataclass
class Target:
    name: str
    base_url: str
    pid: int

    @property
    def chat_url(self) -> str:
        return self.base_url + CHAT_PATH


@dataclass(frozen=True)
class Clock:
    """Where the run started: wall time, load, and CPU used by the machine and by us."""

    started: float
    load: str
    machine_busy_s: float
    ours_s: float

    @classmethod
    def now(cls) -> Clock:
        t = os.times()
        ours = t.user + t.system + t.children_user + t.children_system
        return cls(time.monotonic(), _loadavg(), machine_busy_seconds(), ours)


def machine_busy_seconds() -> float:
    """CPU-seconds all cores spent busy since boot (/proc/stat, idle and iowait excluded)."""
    with contextlib.suppress(OSError, ValueError):
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    return 0.0


def _loadavg() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


def other_cpu_share(start: Clock, server_pids: Sequence[int]) -> str:
    """How much CPU processes outside the benchmark took during the run (noise indicator)."""
    end = Clock.now()
    ours = end.ours_s - start.ours_s
    for pid in server_pids:
        with contextlib.suppress(OSError):
            ours += cpu_seconds(pid)
    other = max(0.0, end.machine_busy_s - start.machine_busy_s - ours)
    capacity = (end.started - start.started) * (os.cpu_count() or 1)
    return f"{other:.0f} CPU-s ({100 * other / capacity:.0f}% of the machine)" if capacity else "?"


@dataclass
class Context:
    settings: Settings
    tmp: Path
    targets: dict[str, Target]
    raw: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    clock: Clock = field(default_factory=lambda: Clock.now())
    other_cpu: str = "?"

    def names(self, rep: int = 0) -> list[str]:
        """Available targets, rotated per repetition so no target always runs first."""
        names = [n for n in TARGETS if n in self.targets]
        shift = rep % len(names) if names else 0
        return names[shift:] + names[:shift]

    @property
    def has_proxy(self) -> bool:
        return "proxy" in self.targets


# ---------------------------------------------------------------- child processes


def _die_with_parent() -> None:
    """Linux: a child gets SIGKILL if run.py dies without cleaning up (e.g. kill -9)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Children:
    """Starts server processes in their own process groups and always stops them all."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "wb")
        proc = subprocess.Popen(
            list(argv), cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def log_tail(self, name: str, lines: int = 8) -> str:
        path = self.log_dir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=STOP_GRACE_S)

    def stop_all(self) -> None:
        for name in list(self.procs)[::-1]:
            self.stop(name)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(proc: subprocess.Popen[bytes], url: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll `url` until it answers 200; raise if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode} before becoming ready")
        try:
            with urllib.request.urlopen(_get(url), timeout=1.0) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"not ready at {url} after {timeout_s:.0f}s")


def _get(url: str, key: str = API_KEY) -> urllib.request.Request:
    return urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})


def proxy_metrics(target: Target) -> dict[str, float]:
    """The proxy's Prometheus samples by name (labels dropped); {} if /metrics fails."""
    try:
        with urllib.request.urlopen(_get(target.base_url + "/metrics", ADMIN_KEY), timeout=5) as resp:
            text = resp.read().decode()
    except (urllib.error.URLError, OSError):
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name.split("{", 1)[0]] = float(value)
    return out


def _post(url: str, body: str) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body.encode(), headers=HEADERS, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def start_fake(kids: Children, python: str, first_gap_ms: float) -> Target:
    port = free_port()
    argv = [python, str(BENCH_DIR / "fake_openai.py"), "--port", str(port), "--first-gap-ms", str(first_gap_ms)]
    proc = kids.start("fake", argv)
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, base + "/v1/models")
    return Target("direct", base, proc.pid)


def start_passthrough(kids: Children, python: str, upstream: str) -> Target:
    port = free_port()
    argv = [python, str(BENCH_DIR / "passthrough.py"), "--port", str(port), "--upstream", upstream]
    proc = kids.start("passthrough", argv)
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, base + "/v1/models")
    return Target("passthrough", base, proc.pid)


def proxy_unavailable_reason(python: str) -> str | None:
    """None if `python -m provider_router serve --help` works, else why not."""
    try:
        done = subprocess.run([python, "-m", "provider_router", "serve", "--help"], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`provider_router serve --help` failed: {e}"
    if done.returncode == 0:
        return None
    last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    return f"`python -m provider_router serve --help` exited {done.returncode}: {last[0]}"


def write_proxy_config(tmp: Path, port: int, upstream: str) -> tuple[Path, Path]:
    db = tmp / "bench.db"
    config = tmp / "config.yaml"
    config.write_text(
        "server: {host: 127.0.0.1, port: %d}\n"
        "database: {path: %s}\n"
        "auth: {admin_key: %s}\n"
        "providers:\n"
        '  - {name: fake, type: openai, base_url: "%s/v1", api_key: "%s"}\n'
        "models:\n"
        '  - {name: "*", provider: fake}\n' % (port, json.dumps(str(db)), ADMIN_KEY, upstream, API_KEY)
    )
    return config, db


def start_proxy(kids: Children, python: str, tmp: Path, upstream: str) -> Target:
    port = free_port()
    config, db = write_proxy_config(tmp, port, upstream)
    argv = [python, "-m", "provider_router", "serve", "--config", str(config),
            "--port", str(port), "--db", str(db)]
    proc = kids.start("proxy", argv)
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, base + "/v1/models")
    return Target("proxy", base, proc.pid)


# ---------------------------------------------------------------- preflight checks


def check_plain(url: str) -> str | None:
    status, body = _post(url, BODY_PLAIN)
    if status != 200:
        return f"non-stream request returned HTTP {status}: {body[:200]!r}"
    try:
        content = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return f"non-stream reply is not a chat.completion: {body[:200]!r}"
    return None if content == FAKE_CONTENT else f"unexpected content {content!r}"


def stream_reply_ok(body: bytes) -> bool:
    return b"[DONE]" in body and body.count(b"data:") >= STREAM_EVENTS_MIN + 1


def check_stream(url: str) -> str | None:
    status, body = _post(url, BODY_STREAM)
    if status != 200:
        return f"stream request returned HTTP {status}: {body[:200]!r}"
    if not stream_reply_ok(body):
        return f"stream reply lacks 64 chunks + usage + [DONE] ({body.count(b'data:')} events)"
    return None


def preflight(target: Target) -> str | None:
    return check_plain(target.chat_url) or check_stream(target.chat_url)


# ---------------------------------------------------------------- /proc readings


def read_status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live child processes (the proxy's log
    writer process), from /proc/<pid>/stat."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields_ = stat.read_text().rsplit(")", 1)[1].split()
            if stat.parent.name == str(pid) or int(fields_[1]) == pid:  # itself, or its child
                total += (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")
    return total


# ---------------------------------------------------------------- wrk


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    non_2xx: int

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


WRK_DONE = """
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_JSON {\\"requests\\":%d,\\"duration_us\\":%d,\\"p50_us\\":%d,\\"p99_us\\":%d," ..
    "\\"connect\\":%d,\\"read\\":%d,\\"write\\":%d,\\"timeout\\":%d,\\"status\\":%d}\\n",
    summary.requests, summary.duration, latency:percentile(50.0), latency:percentile(99.0),
    e.connect, e.read, e.write, e.timeout, e.status))
end
"""


def _lua_string(text: str) -> str:
    return "[==[" + text + "]==]"


def wrk_script(bodies: Sequence[str]) -> str:
    """POST script; with several bodies, requests cycle through them (slower path in wrk)."""
    lines = ['wrk.method = "POST"']
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in HEADERS.items()]
    if len(bodies) == 1:
        lines.append(f"wrk.body = {_lua_string(bodies[0])}")
    else:
        lines.append("local bodies = {" + ", ".join(_lua_string(b) for b in bodies) + "}")
        lines.append("local n = 0")
        lines.append("function request()\n  n = n + 1\n"
                     "  return wrk.format(nil, nil, nil, bodies[(n % #bodies) + 1])\nend")
    return "\n".join(lines) + "\n" + WRK_DONE


def run_wrk(ctx: Context, url: str, connections: int, duration_s: int,
            bodies: Sequence[str] = (BODY_PLAIN,)) -> WrkResult:
    script = ctx.tmp / f"wrk-{abs(hash(tuple(bodies)))}.lua"
    if not script.exists():
        script.write_text(wrk_script(bodies))
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--timeout", "10s",
            "-s", str(script), url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return _wrk_result(json.loads(line[len("BENCH_JSON "):]))
    raise RuntimeError(f"wrk printed no result (exit {done.returncode}): {done.stderr.strip()[-300:]}")


def _wrk_result(d: dict[str, int]) -> WrkResult:
    errors = d["connect"] + d["read"] + d["write"] + d["timeout"]
    return WrkResult(d["requests"], d["duration_us"] / 1e6, d["p50_us"] / 1000, d["p99_us"] / 1000,
                     errors, d["status"])


def ensure_wrk() -> None:
    if shutil.which("wrk"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit("wrk is not installed; install it (e.g. `apt-get install -y wrk`) and rerun")
    print("wrk not found: installing it with apt-get ...", file=sys.stderr, flush=True)
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        subprocess.run(argv, check=True, timeout=600, stdout=subprocess.DEVNULL,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if not shutil.which("wrk"):
        raise SystemExit("apt-get did not provide wrk")


def note_wrk_errors(ctx: Context, name: str, what: str, res: WrkResult) -> None:
    if res.errors or res.non_2xx:
        ctx.notes.append(f"{LABELS.get(name, name)} {what}: {res.non_2xx} non-2xx and {res.errors} socket "
                         f"errors out of {res.requests} requests; its figures are suspect.")


# ---------------------------------------------------------------- formatting helpers


def med(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}×"


def verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("✅" if ok else "❌")


def count_label(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else f"{n:,}"


def figure_row(metric: str, values: dict[str, float | None], digits: int = 2, **extra: str) -> Row:
    """A row with one figure per target and proxy ratios to direct and to pass-through."""
    cells = {n: fmt(values.get(n), digits) for n in TARGETS}
    proxy = values.get("proxy")
    return Row(metric, cells["direct"], cells["passthrough"], cells["proxy"],
               ratio(proxy, values.get("direct")), ratio(proxy, values.get("passthrough")), **extra)


def added_row(metric: str, added: dict[str, float | None], target: str = "",
              ok: Callable[[float, float | None], bool] | None = None) -> Row:
    """A row of figures added on top of direct: only pass-through and proxy, ratio to pass-through."""
    proxy, floor = added.get("proxy"), added.get("passthrough")
    met = verdict(ok(proxy, floor) if ok and proxy is not None else None)
    return Row(metric, "—", fmt(floor, 3), fmt(proxy, 3), "—", ratio(proxy, floor), target, met)


def medians(samples: dict[str, list[float]]) -> dict[str, float | None]:
    return {name: med(values) for name, values in samples.items()}


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- measurements


LATENCY_SLICE_S = 1  # wrk runs whole seconds


def measure_latency(ctx: Context) -> list[Row]:
    """Non-stream latency at concurrency 1 (wrk -c1). Each repetition is `duration_s`
    rounds; a round runs every target for one short slice, back to back, in an order rotated
    each round, so a noisy second of the machine hits the three targets alike. Added
    latency is paired within each round (target − direct, seconds apart), a repetition's
    is the median over its rounds, and the target's ratio (proxy added p50 ÷ pass-through
    added p50) is worked out per repetition; the row shows the median of those ratios and
    the notes their spread."""
    s = ctx.settings
    names = ctx.names()
    rounds = max(1, s.duration_s // LATENCY_SLICE_S)
    p50: dict[str, list[float]] = {n: [] for n in names}  # one figure per slice
    p99: dict[str, list[float]] = {n: [] for n in names}
    added50: dict[str, list[float]] = {n: [] for n in names if n != "direct"}  # one per repetition
    added99: dict[str, list[float]] = {n: [] for n in names if n != "direct"}
    noise = PhaseNoise(ctx)
    for rep in range(s.reps):
        progress(f"latency c=1 rep {rep + 1}/{s.reps}: {rounds} rounds of {LATENCY_SLICE_S} s per target")
        in_rep50: dict[str, list[float]] = {n: [] for n in added50}
        in_rep99: dict[str, list[float]] = {n: [] for n in added99}
        for r in range(rounds):
            got: dict[str, WrkResult] = {}
            for name in ctx.names(rep + r):
                got[name] = res = run_wrk(ctx, ctx.targets[name].chat_url, 1, LATENCY_SLICE_S)
                note_wrk_errors(ctx, name, "latency run", res)
                p50[name].append(res.p50_ms)
                p99[name].append(res.p99_ms)
            for name in in_rep50:
                in_rep50[name].append(got[name].p50_ms - got["direct"].p50_ms)
                in_rep99[name].append(got[name].p99_ms - got["direct"].p99_ms)
        for name in added50:
            added50[name].append(statistics.median(in_rep50[name]))
            added99[name].append(statistics.median(in_rep99[name]))
    ctx.raw["latency"] = {"slice_s": LATENCY_SLICE_S, "rounds_per_rep": rounds, "p50_ms": p50, "p99_ms": p99,
                          "added_p50_ms_per_rep": added50, "added_p99_ms_per_rep": added99}
    ratios = per_rep_ratios(added50)
    ctx.notes.append(latency_note(s.reps, rounds, ratios, added50, noise.share()))
    median_ratio = med(ratios)
    a50 = medians(added50)
    return [
        figure_row("latency p50, non-stream, c=1 (ms)", medians(p50), 3),
        figure_row("latency p99, non-stream, c=1 (ms)", medians(p99), 3),
        # Its ratio is the median of the per-repetition ratios, not the ratio of the two medians.
        Row("added latency p50 vs direct (ms)", "—", fmt(a50.get("passthrough"), 3), fmt(a50.get("proxy"), 3), "—",
            "n/a" if median_ratio is None else f"{median_ratio:.2f}×", "≤ 1.2× pass-through",
            verdict(None if median_ratio is None else median_ratio <= 1.2)),
        added_row("added latency p99 vs direct (ms)", medians(added99)),
    ]


def per_rep_ratios(added: dict[str, list[float]]) -> list[float]:
    """Proxy added ÷ pass-through added, one per repetition (infinite where the pass-through
    added nothing: that repetition counts against the proxy, never for it)."""
    return [p / f if f > 0 else math.inf for p, f in zip(added.get("proxy", []), added.get("passthrough", []))]


def latency_note(reps: int, rounds: int, ratios: list[float], added: dict[str, list[float]], noise: float) -> str:
    def ms(values: list[float]) -> str:
        return ", ".join(f"{v:.3f}" for v in values) or "n/a"

    spread = f"{min(ratios):.2f}–{max(ratios):.2f}×" if ratios else "n/a"
    return (f"latency at c=1: {reps} repetitions of {rounds} rounds of {LATENCY_SLICE_S} s per target, "
            f"rotated; proxy ÷ pass-through added p50 per repetition {', '.join(f'{r:.2f}' for r in ratios) or 'n/a'} "
            f"(median {fmt(med(ratios))}×, spread {spread}); added p50 per repetition, pass-through "
            f"{ms(added.get('passthrough', []))} ms, proxy {ms(added.get('proxy', []))} ms; "
            f"other processes used {noise:.0f}% of the machine during it"
            + (" (a busy machine: trust neither the figures nor the verdict; rerun when it is quiet)."
               if noise > 10 else "."))


class PhaseNoise:
    """CPU that processes outside the benchmark took during one phase (its servers, their
    children and our own children, wrk included, are ours)."""

    def __init__(self, ctx: Context) -> None:
        self.pids = [t.pid for t in ctx.targets.values()]
        self.start = self._now()

    def _now(self) -> tuple[float, float, float]:
        t = os.times()
        ours = t.user + t.system + t.children_user + t.children_system + sum(cpu_seconds(p) for p in self.pids)
        return time.monotonic(), machine_busy_seconds(), ours

    def share(self) -> float:
        """Percent of the machine's CPU taken by other processes since this was made."""
        (t0, busy0, ours0), (t1, busy1, ours1) = self.start, self._now()
        other = max(0.0, (busy1 - busy0) - (ours1 - ours0))
        capacity = (t1 - t0) * (os.cpu_count() or 1)
        return 100 * other / capacity if capacity else 0.0


def measure_throughput(ctx: Context) -> list[Row]:
    """Non-stream req/s at the configured concurrency, plus server CPU time per request."""
    s = ctx.settings
    rps: dict[str, list[float]] = {n: [] for n in ctx.names()}
    cpu_us: dict[str, list[float]] = {n: [] for n in ctx.names()}
    for rep in range(s.reps):
        for name in ctx.names(rep):
            progress(f"throughput c={s.concurrency} rep {rep + 1}/{s.reps}: {name}")
            pid = ctx.targets[name].pid
            cpu0 = cpu_seconds(pid)
            res = run_wrk(ctx, ctx.targets[name].chat_url, s.concurrency, s.duration_s)
            note_wrk_errors(ctx, name, "throughput run", res)
            rps[name].append(res.rps)
            cpu_us[name].append((cpu_seconds(pid) - cpu0) / max(res.requests, 1) * 1e6)
    ctx.raw["throughput"] = {"rps": rps, "cpu_us_per_request": cpu_us}
    rps_med = medians(rps)
    proxy, floor = rps_med.get("proxy"), rps_med.get("passthrough")
    ok = None if proxy is None or floor is None else proxy >= 0.8 * floor
    return [
        figure_row(f"throughput, non-stream, c={s.concurrency} (req/s)", rps_med, 0,
                   target="≥ 0.8× pass-through", met=verdict(ok)),
        figure_row("server CPU per request at that load (µs)", medians(cpu_us), 0),
    ]


async def _stream_once(session: aiohttp.ClientSession, url: str) -> tuple[float, float, bool]:
    """(time to first body byte, total time, reply complete) for one streamed completion."""
    t0 = time.perf_counter()
    async with session.post(url, data=BODY_STREAM, headers=HEADERS) as resp:
        first = await resp.content.readany()
        t1 = time.perf_counter()
        body = bytearray(first)
        while chunk := await resp.content.readany():
            body += chunk
        t2 = time.perf_counter()
    return t1 - t0, t2 - t0, resp.status == 200 and stream_reply_ok(bytes(body))


async def _stream_batch(url: str, count: int, concurrency: int) -> list[tuple[float, float, bool]]:
    results: list[tuple[float, float, bool]] = []
    remaining = iter(range(count))
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for _ in range(min(3, count)):  # warm the keep-alive connection(s)
            await _stream_once(session, url)

        async def worker() -> None:
            for _ in remaining:
                results.append(await _stream_once(session, url))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def _use_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def measure_streaming(ctx: Context) -> list[Row]:
    """64-chunk SSE replies through a small aiohttp client: TTFB and total time."""
    s = ctx.settings
    per_rep = max(1, s.stream_requests // s.reps)
    ttfb: dict[str, list[float]] = {n: [] for n in ctx.names()}
    total: dict[str, list[float]] = {n: [] for n in ctx.names()}
    _use_uvloop()
    for rep in range(s.reps):
        for name in ctx.names(rep):
            progress(f"streaming c={s.stream_concurrency} rep {rep + 1}/{s.reps}: {name}")
            batch = asyncio.run(_stream_batch(ctx.targets[name].chat_url, per_rep, s.stream_concurrency))
            bad = sum(1 for *_, ok in batch if not ok)
            if bad:
                ctx.notes.append(f"{LABELS[name]} streaming: {bad} of {len(batch)} replies incomplete.")
            ttfb[name] += [a * 1000 for a, _, _ in batch]
            total[name] += [b * 1000 for _, b, _ in batch]
    ctx.raw["streaming"] = {"ttfb_ms": ttfb, "total_ms": total}
    ttfb_med, total_med = medians(ttfb), medians(total)
    return [
        figure_row(f"stream TTFB median, c={s.stream_concurrency} (ms)", ttfb_med, 3),
        figure_row("stream total time median (ms)", total_med, 3),
        added_row("stream added TTFB vs direct (ms)", _minus_direct(ttfb_med), "≤ 1 ms",
                  lambda proxy, _floor: proxy <= 1.0),
        added_row("stream added total time vs direct (ms)", _minus_direct(total_med)),
    ]


def _minus_direct(values: dict[str, float | None]) -> dict[str, float | None]:
    direct = values.get("direct")
    return {n: (v - direct if v is not None and direct is not None else None)
            for n, v in values.items() if n != "direct"}


def drive_requests(ctx: Context, name: str, count: int, cap_s: float) -> int:
    """Send about `count` mixed requests (wrk in short slices); returns how many completed."""
    s = ctx.settings
    bodies = [BODY_PLAIN] * (s.mix_stream_every - 1) + [BODY_STREAM]
    done, rate = 0, 0.0  # the first 1 s slice measures the rate
    deadline = time.monotonic() + cap_s
    while done < count and time.monotonic() < deadline:
        wanted = (count - done) / rate if rate else 1
        slice_s = int(min(10, max(1, wanted), max(1, deadline - time.monotonic())))
        res = run_wrk(ctx, ctx.targets[name].chat_url, s.concurrency, slice_s, bodies)
        note_wrk_errors(ctx, name, "memory run", res)
        done += res.requests
        rate = max(res.rps, 1.0)
    if done < count:
        ctx.notes.append(f"{LABELS[name]} memory run hit its {cap_s:.0f}s cap after {done} requests.")
    return done


def measure_memory(ctx: Context) -> list[Row]:
    """VmRSS after N/2 and N requests (stream every k-th), VmHWM at the end, growth over the 2nd half."""
    s = ctx.settings
    half = s.requests // 2
    cap_s = max(60.0, half / 200)
    readings: dict[str, dict[str, float]] = {}
    for name in ("passthrough", "proxy"):
        if name not in ctx.targets:
            continue
        pid = ctx.targets[name].pid
        r: dict[str, float] = {}
        for phase in ("half", "full"):
            progress(f"memory: {name}, {phase} ({count_label(half)} requests)")
            r[f"requests_{phase}"] = drive_requests(ctx, name, half, cap_s)
            time.sleep(1.0)  # let queued log writes land before reading
            r[f"rss_{phase}"] = read_status_kib(pid, "VmRSS") * 1024 / MIB
            if name == "proxy":
                m = proxy_metrics(ctx.targets[name])
                r[f"queue_{phase}"] = m.get("provider_router_log_queue_depth", math.nan)
                r["dropped"] = m.get("provider_router_log_records_dropped_total", math.nan)
        r["hwm"] = read_status_kib(pid, "VmHWM") * 1024 / MIB
        readings[name] = r
    ctx.raw["memory"] = readings
    sent = "; ".join(f"{LABELS[n]} {r['requests_half']:,.0f} + {r['requests_full']:,.0f}"
                     for n, r in readings.items())
    ctx.notes.append(f"memory phases really sent (wrk runs whole seconds): {sent}.")

    def pick(key: str) -> dict[str, float | None]:
        return {n: readings[n][key] if n in readings else None for n in ("passthrough", "proxy")}

    growth = {n: (readings[n]["rss_full"] - readings[n]["rss_half"]) if n in readings else None
              for n in ("passthrough", "proxy")}
    g = growth["proxy"]
    mixed = f"1 in {s.mix_stream_every} streamed"
    return [
        _memory_row(f"RSS after {count_label(half)} requests ({mixed}) (MiB)", pick("rss_half")),
        _memory_row(f"RSS after {count_label(2 * half)} requests (MiB)", pick("rss_full")),
        _memory_row("peak RSS, VmHWM (MiB)", pick("hwm")),
        Row(f"RSS growth over the last {count_label(half)} (MiB)", "—", fmt(growth["passthrough"], 1),
            fmt(g, 1), "—", "—", "< 10 MiB", verdict(None if g is None else g < 10)),
        *_log_queue_rows(readings.get("proxy")),
    ]


def _log_queue_rows(r: dict[str, float] | None) -> list[Row]:
    """The proxy's log backlog at the RSS readings (a backlog looks like a leak) and drops."""
    if r is None or math.isnan(r.get("queue_full", math.nan)):
        return [Row("proxy log queue at the readings / records dropped", "—", "—", "n/a")]
    dropped = r["dropped"]
    queue = f"{r['queue_half']:,.0f} / {r['queue_full']:,.0f}"
    return [
        Row("proxy log queue at the two readings (records + changes)", "—", "—", queue),
        Row("proxy log records dropped so far (queue full)", "—", "—", fmt(dropped, 0), target="0",
            met=verdict(None if math.isnan(dropped) else dropped == 0)),
    ]


def _memory_row(metric: str, values: dict[str, float | None]) -> Row:
    return Row(metric, "—", fmt(values["passthrough"], 1), fmt(values["proxy"], 1), "—",
               ratio(values["proxy"], values["passthrough"]))


def _json_from(ctx: Context, script: str, *args: str, timeout_s: float = 600) -> dict[str, Any] | None:
    """Run a measurement script of bench/ (its own process and event loop); its JSON result."""
    argv = [ctx.settings.python, str(Path(__file__).parent / script), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        ctx.notes.append(f"{script} failed: {done.stderr.strip().splitlines()[-1:]}")
        return None
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def measure_threaded(ctx: Context) -> list[Row]:
    """Turn-by-turn conversations through the proxy against a fake Qwen upstream (bench/threaded.py)."""
    turns = 20 if ctx.settings.quick else 50
    r = _json_from(ctx, "threaded.py", "--conversations", "8", "--turns", str(turns))
    if r is None:
        return [Row("threaded path: turn-by-turn conversations (req/s)", "—", "—", "n/a")]
    ctx.raw["threaded"] = r
    first, last = r["bytes_turn_2"], r[f"bytes_turn_{turns}"]
    return [
        Row("threaded path: turn-by-turn conversations, 8 at once (req/s)", "—", "—", fmt(r["turns_per_s"], 0)),
        Row(f"threaded path: upstream bytes per turn, turn 2 → turn {turns}", "—", "—",
            f"{first:,.0f} → {last:,.0f}", "—", "—", "flat in turn number", verdict(last <= first)),
    ]


def measure_log_writer(ctx: Context) -> list[Row]:
    """The log writer alone, realistic records (1 in 4 a 64-chunk stream): bench/log_writer.py."""
    n = 20_000 if ctx.settings.quick else 100_000
    r = _json_from(ctx, "log_writer.py", "--records", str(n))
    if r is None:
        return [Row("log writer alone (records/s)", "—", "—", "n/a")]
    ctx.raw["log_writer"] = r
    return [
        Row("log writer alone (records/s)", "—", "—", fmt(r["records_per_s"], 0), "—", "—",
            "≥ 20,000", verdict(r["records_per_s"] >= 20_000)),
        Row("log writer: CPU per record (µs)", "—", "—", fmt(r["cpu_us_per_record"], 0)),
        Row("log writer alone, non-stream records only (records/s)", "—", "—", fmt(r["plain_records_per_s"], 0)),
        Row("log writer, non-stream records only: CPU per record (µs)", "—", "—", fmt(r["plain_cpu_us_per_record"], 0)),
        Row("stream assembly for the log, one 64-chunk stream (µs CPU)", "—", "—", fmt(r["stream_assembly_us"], 0)),
        Row("its events read in one call / by the SSE parser alone (µs CPU)", "—", "—",
            f"{fmt(r['stream_events_us'], 0)} / {fmt(r['stream_events_parser_us'], 0)}"),
        Row("log writer: records lost (both runs)", "—", "—", f"{r['lost'] + r['plain_lost']:.0f}", "—", "—", "0",
            verdict(r["lost"] + r["plain_lost"] == 0)),
    ]


# ---------------------------------------------------------------- the log's storage (bench/store.py)

OLD_WRITER_COMMIT = "921da0c"  # the writer before the conversation tree: the agent row's baseline
OLD_WRITER_RPS = 1_200  # its figure quoted in issue 13, when that commit cannot be run


def _store(ctx: Context, phase: str, *args: str, timeout_s: float = 900) -> dict[str, Any] | None:
    progress(f"store: {phase} (bench/store.py)")
    r = _json_from(ctx, "store.py", "--phase", phase, *args, timeout_s=timeout_s)
    if r is not None:
        ctx.raw[f"store_{phase}"] = r
    return r


def _size(n: float) -> str:
    return f"{n / MIB:,.1f} MiB" if n >= MIB else f"{n / 1024:,.0f} KiB"


def measure_tree_size(ctx: Context) -> list[Row]:
    """One conversation, each request resending its history, through a real proxy (openai SDK)."""
    turns = 50 if ctx.settings.quick else 200
    r = _store(ctx, "conversation", "--turns", str(turns))
    metric = f"log DB after one {turns}-turn conversation of 2 KB messages (× distinct text)"
    if r is None:
        return [Row(metric, "—", "—", "n/a")]
    return [Row(metric, "—", "—", f"{r['ratio']:.2f}× ({_size(r['db_bytes'])} / {_size(r['distinct_text_bytes'])})",
                "—", "—", "≤ 2× (before: 102×)", verdict(r["ratio"] <= 2))]


def measure_oneshot_size(ctx: Context) -> list[Row]:
    """One-shot requests through the real writer process: DB bytes per request vs the bodies'."""
    n = 20_000 if ctx.settings.quick else 200_000
    rows = []
    for shape, extra in (("OpenAI's full reply", ()), ("minimal reply", ("--minimal",))):
        r = _store(ctx, "oneshot", "--requests", str(n), *extra)
        metric = f"{count_label(n)} one-shot requests, {shape}: DB bytes per request (bodies' bytes)"
        if r is None:
            rows.append(Row(metric, "—", "—", "n/a"))
            continue
        per, target = r["db_bytes_per_request"], r["target_bytes_per_request"]
        rows.append(Row(metric, "—", "—", f"{per:,.0f} ({r['body_bytes_per_request']:,.0f})", "—", "—",
                        f"≤ {target:,.0f} (bodies × 1.5 + 300)", verdict(per <= target)))
    return rows


INSPECTION = ("stats", "/admin/stats", "logs --model", "logs --provider", "logs --client", "logs --status",
              "logs --outcome", "logs --since 1h", "logs --session", "logs -q zyzzogeton", "logs -q file", "sessions list")


def measure_inspection(ctx: Context) -> list[Row]:
    """Inspection reads on a database of 1M mixed requests built through the real writer."""
    n = 100_000 if ctx.settings.quick else 1_000_000
    r = _store(ctx, "scale", "--requests", str(n), timeout_s=1800)
    label = count_label(n)
    if r is None:
        return [Row(f"{label} requests: inspection query times", "—", "—", "n/a")]
    rows = [Row(f"{label} mixed requests through the writer (records/s; DB size)", "—", "—",
                f"{r['records'] / r['fill_s']:,.0f}; {_size(r['db_bytes'])}")]
    for name in INSPECTION:
        ms, cli = r["query_ms"].get(name), r["cli_ms"].get(name)
        wall = "" if cli is None else f" (CLI {cli:,.0f} ms)" if name != "/admin/stats" else ""
        if name.startswith("/"):
            metric = f"{label} requests: `GET {name}` over HTTP, ms"
        else:
            command = f"`{name}" + (" -n 20`" if name.startswith("logs") else "`")
            metric = f"{label} requests: {command} query time, ms (CLI wall time with start-up)"
        rows.append(Row(metric, "—", "—",
                        "n/a" if ms is None else f"{ms:,.1f}{wall}", "—", "—", "≤ 100 ms",
                        verdict(None if ms is None else ms <= 100)))
    for name, ms in r.get("ui_ms", {}).items():
        rows.append(Row(f"{label} requests: dashboard `GET {name}` over HTTP, ms", "—", "—", f"{ms:,.1f}", "—", "—",
                        "≤ 100 ms", verdict(ms <= 100)))
    plans = dict(r.get("plans", {}))
    rollups = plans.pop("rollups rows", None)
    for name, plan in plans.items():
        ctx.notes.append(f"query plan of {name} (over 100 ms): " + " / ".join(plan))
    if rollups:
        ctx.notes.append(f"roll-up rows for the {label} requests: {int(rollups[0]):,}.")
    return rows


def measure_agent_writer(ctx: Context) -> list[Row]:
    """The writer with agent-shaped traffic (histories growing to 60 KB) against the old writer."""
    n = 5_000 if ctx.settings.quick else 20_000
    r = _store(ctx, "agent", "--requests", str(n), "--old-commit", OLD_WRITER_COMMIT)
    if r is None:
        return [Row("log writer, agent-shaped traffic (records/s)", "—", "—", "n/a")]
    old = r.get("old")
    base = old["records_per_s"] if old else OLD_WRITER_RPS
    where = f"{OLD_WRITER_COMMIT}, same run" if old else "issue 13's figure"
    if not old:
        ctx.notes.append(f"the old writer ({OLD_WRITER_COMMIT}) could not run: its rate is issue 13's figure.")
    old_cpu = fmt(old["cpu_us_per_record"], 0) if old else "n/a"
    return [
        Row("log writer, agent-shaped traffic, histories growing to 60 KB (records/s)", "—", "—",
            fmt(r["records_per_s"], 0), "—", "—", f"≥ 10× before ({base:,.0f}, {where})",
            verdict(r["records_per_s"] >= 10 * base)),
        Row(f"log writer, agent-shaped traffic: CPU per record, µs (before: {old_cpu})", "—", "—",
            fmt(r["cpu_us_per_record"], 0)),
        Row("log writer, agent-shaped traffic: records lost", "—", "—", f"{r['lost']:.0f}", "—", "—", "0",
            verdict(r["lost"] == 0)),
    ]


def _count_2xx_rows(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as c:
        return int(c.execute("SELECT count(*) FROM requests WHERE status BETWEEN 200 AND 299").fetchone()[0])


def measure_log_complete(ctx: Context) -> list[Row]:
    """wrk at full throughput for 60 s (one-shot requests); every answered request has its row."""
    metric = "rows for the 2xx answered in 60 s at full throughput (rows / answered)"
    if not ctx.has_proxy:
        return [Row(metric, "—", "—", "n/a")]
    s = ctx.settings
    duration = 10 if s.quick else 60
    metric = metric.replace("60 s", f"{duration} s")
    db = ctx.tmp / "bench.db"
    target = ctx.targets["proxy"]
    before = _count_2xx_rows(db)
    progress(f"log completeness: wrk -c{s.concurrency} for {duration} s against the proxy")
    res = run_wrk(ctx, target.chat_url, s.concurrency, duration)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proxy_metrics(target).get("provider_router_log_queue_depth", 0) > 0:
        time.sleep(0.5)
    time.sleep(1.0)  # the last commit's rows become visible to a new reader
    rows = _count_2xx_rows(db) - before
    answered = res.requests - res.non_2xx
    missing = max(0, answered - rows)
    dropped = proxy_metrics(target).get("provider_router_log_records_dropped_total", math.nan)
    ctx.raw["log_complete"] = {"answered_2xx": answered, "rows_2xx": rows, "wrk": asdict(res), "dropped": dropped}
    ctx.notes.append(f"log completeness: wrk counted {res.requests:,} answers ({res.non_2xx} non-2xx, "
                     f"{res.errors} socket errors) at {res.rps:,.0f} req/s; {rows:,} new 2xx rows (requests "
                     "still in flight when wrk stops are answered and logged but not counted by wrk).")
    return [Row(metric, "—", "—", f"{rows:,} / {answered:,} ({missing} missing)", "—", "—", "0 missing",
                verdict(missing == 0))]


CLIENT_CHANGE_BEFORE = "921da0c"  # the daemon with its own httptools client (issue 14's "before")


def measure_concurrent_streams(ctx: Context) -> list[Row]:
    """1,000 streams held open at once, direct and through a proxy daemon (bench/streams.py),
    and the daemon's CPU per plain request before and after the upstream client change."""
    n = 200 if ctx.settings.quick else 1000
    progress(f"streams: {n} at once, now and at {CLIENT_CHANGE_BEFORE} (bench/streams.py)")
    now = _json_from(ctx, "streams.py", "--json", "--streams", str(n))
    before = None
    with tempfile.TemporaryDirectory(prefix="bench-before-") as src:
        archive = subprocess.run(["git", "archive", CLIENT_CHANGE_BEFORE, "provider_router"],
                                 cwd=Path(__file__).resolve().parent.parent, capture_output=True)
        if archive.returncode == 0:
            subprocess.run(["tar", "-x", "-C", src], input=archive.stdout, check=True)
            before = _json_from(ctx, "streams.py", "--json", "--streams", str(n), "--src", src)
        else:
            ctx.notes.append(f"streams: {CLIENT_CHANGE_BEFORE} is not in this checkout; no 'before' figure")
    label = f"{n:,} streams at once"
    if now is None:
        return [Row(f"{label}: time to first byte (ms)", "—", "—", "n/a")]
    ctx.raw["streams"] = {"now": now, "before": before}
    waited, calls = now["waited_over_1ms"], now["upstream_calls"]
    cpu = fmt(now["cpu_us_per_plain"], 0)
    if before is not None:
        cpu = f"{fmt(before['cpu_us_per_plain'], 0)} → {cpu}"
    added = {"median": now["proxy_median_ms"] - now["direct_median_ms"], "p99": now["proxy_p99_ms"] - now["direct_p99_ms"]}
    rows = [
        Row(f"{label}: TTFB median (ms)", fmt(now["direct_median_ms"], 0), "—", fmt(now["proxy_median_ms"], 0),
            ratio(now["proxy_median_ms"], now["direct_median_ms"])),
        Row(f"{label}: TTFB p99 (ms)", fmt(now["direct_p99_ms"], 0), "—", fmt(now["proxy_p99_ms"], 0),
            ratio(now["proxy_p99_ms"], now["direct_p99_ms"])),
        Row(f"{label}: TTFB added by the proxy, median / p99 (ms)", "—", "—",
            f"{fmt(added['median'], 0)} / {fmt(added['p99'], 0)}"),
        Row(f"{label}: upstream calls that waited over 1 ms for a connection", "—", "—",
            "n/a" if waited is None else f"{waited:,.0f} of {calls:,.0f}", "—", "—", "0",
            verdict(None if waited is None else waited == 0)),
        Row(f"daemon CPU per plain request, 32 in flight, µs ({CLIENT_CHANGE_BEFORE} httptools client → now)",
            "—", "—", cpu),
    ]
    if before is not None:
        b_added = before["proxy_median_ms"] - before["direct_median_ms"]
        rows.append(Row(f"{label}: TTFB added, median ({CLIENT_CHANGE_BEFORE} → now, ms)", "—", "—",
                        f"{fmt(b_added, 0)} → {fmt(added['median'], 0)}"))
    return rows


def measure_workers(ctx: Context) -> list[Row]:
    """Non-stream req/s of `serve --workers 2` against the one-worker proxy, same fake
    upstream, same load, interleaved; and the rows each logged (every request, or not)."""
    if not ctx.has_proxy:
        return [Row("throughput, 2 workers ÷ 1 worker", "—", "—", "n/a")]
    s = ctx.settings
    tmp = ctx.tmp / "workers2"
    tmp.mkdir(exist_ok=True)
    port = free_port()
    config, db = write_proxy_config(tmp, port, ctx.targets["direct"].base_url)
    base = f"http://127.0.0.1:{port}"
    rps: dict[str, list[float]] = {"1": [], "2": []}
    sent = 0
    with Children(tmp) as kids:
        proc = kids.start("proxy-workers2", [s.python, "-m", "provider_router", "serve", "--config", str(config),
                                             "--port", str(port), "--db", str(db), "--workers", "2"])
        wait_ready(proc, base + "/v1/models")
        urls = {"1": ctx.targets["proxy"].chat_url, "2": base + CHAT_PATH}
        for rep in range(s.reps):
            for n in (["1", "2"] if rep % 2 == 0 else ["2", "1"]):
                progress(f"workers c={s.concurrency} rep {rep + 1}/{s.reps}: {n} worker(s)")
                res = run_wrk(ctx, urls[n], s.concurrency, s.duration_s)
                note_wrk_errors(ctx, f"{n} worker(s)", "workers run", res)
                rps[n].append(res.rps)
                if n == "2":
                    sent += res.requests
        kids.stop("proxy-workers2")  # SIGTERM: the workers flush their logs and exit
    logged = _count_2xx_rows(db)
    ctx.raw["workers"] = {"rps": rps, "sent_to_2": sent, "rows_2xx_logged_by_2": logged}
    one, two = medians(rps)["1"], medians(rps)["2"]
    return [
        Row(f"throughput, non-stream, c={s.concurrency}: 1 worker → 2 workers (req/s)", "—", "—",
            f"{fmt(one, 0)} → {fmt(two, 0)}", "—", "—", f"2 workers ÷ 1: {ratio(two, one)}"),
        Row("2 workers: 2xx requests answered / rows logged", "—", "—", f"{sent:,} / {logged:,}",
            "—", "—", "every row", verdict(logged >= sent)),
    ]


def measure_workers_pg(ctx: Context) -> list[Row]:
    """The same on a PostgreSQL database (a throwaway server of Debian's, as the tests
    start): 1 worker against 2, interleaved, and the most connections the instances held
    (sampled from pg_stat_activity during the runs: each worker's pool, log writer and
    lock connection)."""
    if not ctx.has_proxy:
        return [Row("PostgreSQL: throughput, 2 workers ÷ 1 worker", "—", "—", "n/a")]
    import threading

    import psycopg

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.postgres import running_server

    s = ctx.settings
    tmp = ctx.tmp / "workers_pg"
    tmp.mkdir(exist_ok=True)
    rps: dict[str, list[float]] = {"1": [], "2": []}
    sent = 0
    most = {"1": 0, "2": 0}
    with running_server() as server:
        with psycopg.connect(server.dsn(), autocommit=True) as admin:
            for n in ("1", "2"):  # a database each, so each one's connections are counted apart
                admin.execute(f"CREATE DATABASE bench{n} TEMPLATE template0")
        with Children(tmp) as kids:
            bases = {}
            for n in ("1", "2"):
                port = free_port()
                config, _ = write_proxy_config(tmp, port, ctx.targets["direct"].base_url)
                proc = kids.start(f"proxy-pg-{n}", [s.python, "-m", "provider_router", "serve", "--config", str(config),
                                                    "--port", str(port), "--db", server.dsn(f"bench{n}"), "--workers", n])
                bases[n] = f"http://127.0.0.1:{port}"
                wait_ready(proc, bases[n] + "/v1/models")
            for rep in range(s.reps):
                for n in (["1", "2"] if rep % 2 == 0 else ["2", "1"]):
                    progress(f"workers on PostgreSQL c={s.concurrency} rep {rep + 1}/{s.reps}: {n} worker(s)")
                    done = threading.Event()

                    def sample(n: str = n, done: threading.Event = done) -> None:
                        with psycopg.connect(server.dsn(), autocommit=True) as c:
                            while not done.wait(0.2):
                                row = c.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (f"bench{n}",)).fetchone()
                                most[n] = max(most[n], int(row[0]) if row else 0)

                    sampler = threading.Thread(target=sample, daemon=True)
                    sampler.start()
                    res = run_wrk(ctx, bases[n] + CHAT_PATH, s.concurrency, s.duration_s)
                    done.set()
                    sampler.join()
                    note_wrk_errors(ctx, f"{n} worker(s) on PostgreSQL", "workers run", res)
                    rps[n].append(res.rps)
                    sent += res.requests
            kids.stop("proxy-pg-1")
            kids.stop("proxy-pg-2")
        logged = 0
        for n in ("1", "2"):
            with psycopg.connect(server.dsn(f"bench{n}"), autocommit=True) as c:
                row = c.execute("SELECT count(*) FROM requests WHERE status BETWEEN 200 AND 299").fetchone()
                logged += int(row[0]) if row else 0
    ctx.raw["workers_pg"] = {"rps": rps, "sent": sent, "rows_2xx_logged": logged, "most_connections": most}
    one, two = medians(rps)["1"], medians(rps)["2"]
    return [
        Row(f"PostgreSQL: throughput, non-stream, c={s.concurrency}: 1 worker → 2 workers (req/s)", "—", "—",
            f"{fmt(one, 0)} → {fmt(two, 0)}", "—", "—", f"2 workers ÷ 1: {ratio(two, one)}"),
        Row("PostgreSQL: connections in use, most seen (1 worker / 2 workers)", "—", "—", f"{most['1']} / {most['2']}"),
        Row("PostgreSQL: 2xx requests answered / rows logged", "—", "—", f"{sent:,} / {logged:,}",
            "—", "—", "every row", verdict(logged >= sent)),
    ]


# Adding a measurement = writing one function (Context -> rows) and listing it here.
MEASUREMENTS: dict[str, Callable[[Context], list[Row]]] = {
    "latency": measure_latency,
    "throughput": measure_throughput,
    "streaming": measure_streaming,
    "streams": measure_concurrent_streams,
    "memory": measure_memory,
    "threaded": measure_threaded,
    "log_writer": measure_log_writer,
    "log_complete": measure_log_complete,
    "tree_size": measure_tree_size,
    "oneshot_size": measure_oneshot_size,
    "agent_writer": measure_agent_writer,
    "inspection": measure_inspection,
    "workers": measure_workers,
    "workers_pg": measure_workers_pg,
}


# ---------------------------------------------------------------- report


COLUMNS = ("measurement", "direct", "pass-through", "proxy", "proxy ÷ direct",
           "proxy ÷ pass-through", "target", "met")


def render_table(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * 5 + ["---", ":-:"]) + "|"]
    for r in rows:
        cells = [r.metric, r.direct, r.passthrough, r.proxy, r.vs_direct, r.vs_passthrough, r.target, r.met]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _git(*args: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        if done.returncode == 0:
            return done.stdout.strip()
    return ""


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def render_header(ctx: Context) -> str:
    s = ctx.settings
    commit = _git("rev-parse", "--short", "HEAD") or "no commit yet"
    dirty = " + uncommitted changes" if _git("status", "--porcelain", "provider_router") else ""
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split(" [")[0]
    return "\n".join([
        f"# provider-router benchmark ({'quick' if s.quick else 'full'} run)",
        "",
        f"- when: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; took {time.monotonic() - ctx.clock.started:.0f} s",
        f"- code: {commit}{dirty}",
        f"- machine: {os.cpu_count()} × {_cpu_model()}; Python {platform.python_version()}; "
        f"load average {ctx.clock.load} at start, {_loadavg()} at end",
        f"- noise: other processes used {ctx.other_cpu} during the run "
        "(more than a few % makes absolute figures unreliable; ratios suffer less)",
        f"- method: {s.reps} repetition{'s' if s.reps != 1 else ''} of {s.duration_s} s per target for wrk figures "
        f"(at c=1 in {LATENCY_SLICE_S} s slices, the targets rotated slice by slice) "
        f"({wrk_version.strip()}, 1 thread), targets interleaved; {s.stream_requests} streamed "
        f"requests per target; memory over {count_label(s.requests)} requests per server",
        "- figures are medians over repetitions; \"added\" = target − direct within each "
        "repetition; see bench/README.md for how to read them",
    ])


def write_report(ctx: Context, rows: Sequence[Row]) -> str:
    parts = [render_header(ctx), "", render_table(rows)]
    if ctx.notes:
        parts += ["", "Notes:", ""] + [f"- {n}" for n in ctx.notes]
    report = "\n".join(parts) + "\n"
    ctx.settings.output.parent.mkdir(parents=True, exist_ok=True)
    ctx.settings.output.write_text(report)
    raw = {"settings": {k: str(v) for k, v in asdict(ctx.settings).items()}, "results": ctx.raw,
           "rows": [asdict(r) for r in rows], "notes": ctx.notes}
    ctx.settings.output.with_suffix(".raw").write_text(json.dumps(raw, indent=1))
    return report


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: small counts, about a minute")
    p.add_argument("--reps", type=int, help="repetitions per wrk figure (default 5; quick 3)")
    p.add_argument("--duration", type=int, help="seconds per wrk run (default 5; quick 2)")
    p.add_argument("--concurrency", type=int, default=32, help="connections for throughput (32)")
    p.add_argument("--requests", type=int, help="requests for the memory test (default 100000; quick 10000)")
    p.add_argument("--stream-requests", type=int, help="streamed requests per target (default 500; quick 150)")
    p.add_argument("--stream-concurrency", type=int, default=1, help="streaming client concurrency (1)")
    p.add_argument("--stream-gap-ms", type=float, default=2.0,
                   help="the fake's pause after a stream's first event, like a first token (2)")
    p.add_argument("--mix-stream-every", type=int, default=4,
                   help="in the memory test, every k-th request streams (4)")
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(MEASUREMENTS)}")
    p.add_argument("--python", default=sys.executable, help="interpreter for the servers (this one)")
    p.add_argument("--output", type=Path, default=RESULTS_DIR / "latest.md")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (config, db, server logs)")
    a = p.parse_args(argv)
    only = tuple(x for x in a.only.split(",") if x)
    unknown = set(only) - set(MEASUREMENTS)
    if unknown:
        p.error(f"unknown measurement(s): {', '.join(sorted(unknown))}")
    return Settings(
        quick=a.quick, reps=max(1, a.reps or (3 if a.quick else 5)),
        duration_s=max(1, a.duration or (2 if a.quick else 5)), concurrency=max(1, a.concurrency),
        requests=max(2, a.requests or (10_000 if a.quick else 100_000)),
        stream_requests=max(1, a.stream_requests or (150 if a.quick else 500)),
        stream_concurrency=max(1, a.stream_concurrency), stream_gap_ms=max(0.0, a.stream_gap_ms),
        mix_stream_every=max(1, a.mix_stream_every),
        only=only or tuple(MEASUREMENTS), python=a.python, output=a.output, keep_tmp=a.keep_tmp,
    )


def start_targets(ctx: Context, kids: Children) -> None:
    py = ctx.settings.python
    progress("starting the fake upstream and the pass-through")
    ctx.targets["direct"] = start_fake(kids, py, ctx.settings.stream_gap_ms)
    upstream = ctx.targets["direct"].base_url
    ctx.targets["passthrough"] = start_passthrough(kids, py, upstream)
    reason = proxy_unavailable_reason(py)
    if reason is None:
        progress("starting provider_router")
        try:
            ctx.targets["proxy"] = start_proxy(kids, py, ctx.tmp, upstream)
        except RuntimeError as e:
            reason = f"proxy failed to start: {e}\n```\n{kids.log_tail('proxy')}\n```"
            kids.stop("proxy")
    if reason:
        ctx.notes.append(f"proxy column is n/a: {reason}")
    for name in list(ctx.targets):
        problem = preflight(ctx.targets[name])
        if problem:
            if name != "proxy":
                raise RuntimeError(f"{name} failed its preflight check: {problem}")
            ctx.notes.append(f"proxy column is n/a: preflight failed: {problem}")
            del ctx.targets[name]
            kids.stop("proxy")


def run_measurement(ctx: Context, name: str) -> list[Row]:
    """One measurement's rows; a failure becomes a row and a note, and the run goes on."""
    try:
        return MEASUREMENTS[name](ctx)
    except (RuntimeError, OSError, subprocess.SubprocessError, aiohttp.ClientError, asyncio.TimeoutError,
            sqlite3.Error, KeyError, ValueError) as e:
        ctx.notes.append(f"{name} failed: {type(e).__name__}: {e}")
        return [Row(f"{name}: failed (see notes)")]


def warm_up(ctx: Context) -> None:
    for name in ctx.names():
        run_wrk(ctx, ctx.targets[name].chat_url, 4, 1)


def run(settings: Settings) -> str:
    ensure_wrk()
    tmp = Path(tempfile.mkdtemp(prefix="provider-router-bench-"))
    ctx = Context(settings, tmp, {})
    check_quiet(ctx)
    try:
        with Children(tmp) as kids:
            start_targets(ctx, kids)
            warm_up(ctx)
            rows: list[Row] = []
            for name in settings.only:
                rows += run_measurement(ctx, name)
            check_alive(ctx, kids)
            ctx.other_cpu = other_cpu_share(ctx.clock, [t.pid for t in ctx.targets.values()])
        return write_report(ctx, rows)
    finally:
        if settings.keep_tmp:
            progress(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def check_quiet(ctx: Context) -> None:
    """Warn when the machine is already busy: everything shares its 2 cores."""
    before = machine_busy_seconds()
    time.sleep(1.0)
    busy = (machine_busy_seconds() - before) / (os.cpu_count() or 1)
    if busy > 0.2:
        message = f"the machine was {100 * busy:.0f}% busy in the second before the run started"
        progress(f"warning: {message}; figures will be noisy")
        ctx.notes.append(message + ".")


def check_alive(ctx: Context, kids: Children) -> None:
    for name, proc in kids.procs.items():
        if proc.poll() is not None:
            ctx.notes.append(f"{name} exited (code {proc.returncode}) during the run:\n"
                             f"```\n{kids.log_tail(name)}\n```")


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGINT too: it may arrive ignored
        signal.signal(sig, _raise_interrupt)
    try:
        report = run(settings)
    except KeyboardInterrupt:
        print("\ninterrupted; all servers stopped", file=sys.stderr)
        return 130
    print(report)
    progress(f"written to {settings.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
