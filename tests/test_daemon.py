"""The daemon as users run it: a real process, started from the CLI, stopped with SIGTERM."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.daemon import Spawn
from tests.waiting import until

ROOT = Path(__file__).parent.parent


async def test_readme_request_is_answered_and_counted(spawn: Spawn) -> None:
    """The README's curl request (form content type, as `curl -d` sends) answers from the
    shipped config with no keys, and the row is in the database after SIGTERM."""
    daemon = await spawn((ROOT / "config.yaml").read_text())
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{daemon.url}/v1/chat/completions",
            data=b'{"model":"echo","messages":[{"role":"user","content":"hi"}]}',
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ) as r:
            assert r.status == 200
            body = await r.json()
    assert body["choices"][0]["message"]["content"].endswith(": hi")
    line = await daemon.wait_log("request")
    assert {"request_id", "model", "provider", "status", "outcome", "ttfb_ms", "duration_ms"} <= set(line)
    assert (line["model"], line["status"], line["outcome"]) == ("echo", 200, "ok")
    assert await daemon.stop() == 0
    db = sqlite3.connect(daemon.db)
    assert db.execute("SELECT count(*) FROM requests").fetchone()[0] == 1
    # The line is rendered from the stored record (by the log writer process): same id, same time.
    assert db.execute("SELECT id, finished_at FROM requests").fetchone() == (line["request_id"], line["timestamp"])


def test_cli_help_and_config_errors(tmp_path: Path) -> None:
    """`--help` works through both entry points; a bad config exits 2 naming the key."""
    for cmd in ([sys.executable, "-m", "provider_router", "serve", "--help"], [str(Path(sys.executable).parent / "provider-router"), "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "usage:" in out.stdout.lower()
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers: [{name: e, type: echo, colour: red}]\n")
    out = subprocess.run(
        [sys.executable, "-m", "provider_router", "serve", "--config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert "providers[0].colour" in out.stderr


def test_refuses_public_address_without_client_keys(tmp_path: Path) -> None:
    """Listening beyond loopback with no client keys is refused unless --insecure-no-auth."""
    out = subprocess.run(
        [sys.executable, "-m", "provider_router", "serve", "--config", str(ROOT / "config.yaml"), "--host", "0.0.0.0"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert out.returncode == 2 and "--insecure-no-auth" in out.stderr


async def test_serve_without_a_config_file_runs_the_built_in_echo_model(tmp_path: Path) -> None:
    """`provider-router serve` where there is no config.yaml serves the local echo model
    (no key needed) and says so, instead of refusing for want of providers."""
    import json
    import signal

    from tests.daemon import free_port

    port, log = free_port(), tmp_path / "daemon.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "provider_router", "serve", "--port", str(port), "--db", str(tmp_path / "x.db")],
            stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path,
        )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as s:
            def listening() -> bool:
                assert proc.poll() is None, log.read_text()
                return "listening" in log.read_text()

            await until(listening, "the daemon's `listening` line")
            async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]}) as r:
                assert r.status == 200 and (await r.json())["choices"][0]["message"]["content"].endswith(": hi")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    events = {json.loads(line)["event"]: json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")}
    assert events["no_config_file"]["path"] == str((tmp_path / "config.yaml").resolve())
    assert events["listening"]["models"] == ["echo"]
