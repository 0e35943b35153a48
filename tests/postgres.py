"""A real PostgreSQL server for the test session: Debian's server binaries (the `postgresql`
package, installed with apt-get when missing), a cluster made by initdb in a temporary
directory, served on a free loopback port and stopped at the end. Each test that wants a
database gets a new empty one on it (`pg_db`).

Tests using it are marked `pytest.mark.xdist_group("postgres")` so that under
`pytest -n 2 --dist loadgroup` one worker, and so one server, runs them all.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.daemon import free_port

# The server settings of a throwaway cluster: durability off (a crash loses nothing a test
# needs), few connections' worth of memory, no background noise in the log.
SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "50",
    "shared_buffers": "32MB",
    "listen_addresses": "127.0.0.1",
    "log_min_messages": "warning",
    "TimeZone": "UTC",
}


def server_bin() -> Path:
    """The directory of Debian's PostgreSQL server programs (initdb, pg_ctl, postgres): the
    newest installed version, the `postgresql` package installed first when there is none
    (as root; otherwise the test says how)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        on_path = shutil.which("initdb")
        if on_path:
            return Path(os.path.realpath(on_path)).parent
        if os.geteuid() != 0:
            pytest.fail("the PostgreSQL tests need Debian's server: run `sudo apt-get install -y postgresql`")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], check=True, env=env, stdout=subprocess.DEVNULL)
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
        assert found, "apt-get installed postgresql but no /usr/lib/postgresql/*/bin/initdb"
    return Path(found[-1]).parent


@dataclass(frozen=True)
class Server:
    """A running cluster: `dsn(db)` names one of its databases; `stop()` and `start()` take
    it down and bring it back on the same port (a database going away under load)."""

    host: str
    port: int
    user: str
    bindir: Path | None = None
    data: Path | None = None
    owner: str | None = None

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def stop(self) -> None:
        """A fast shutdown: open connections are cut, as when a server is restarted."""
        assert self.bindir and self.data
        subprocess.run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
            check=True, stdout=subprocess.DEVNULL, **_as_owner(self.owner),
        )  # fmt: skip

    def start(self) -> None:
        assert self.bindir and self.data
        subprocess.run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.data.parent / "server.log"), "-w", "-t", "60",
             "-o", f"-p {self.port}", "start"],
            check=True, stdout=subprocess.DEVNULL, **_as_owner(self.owner),
        )  # fmt: skip


def _as_owner(owner: str | None) -> dict[str, str]:
    """initdb and postgres refuse to run as root: as root they run as `owner`."""
    return {"user": owner} if owner else {}


@contextlib.contextmanager
def running_server() -> Iterator[Server]:
    """A throwaway cluster (trust authentication on loopback only), stopped and removed on
    exit. Also for bench/pg_writes.py."""
    bindir = server_bin()
    owner = None
    if os.geteuid() == 0:
        owner = "postgres" if _user_exists("postgres") else "nobody"
    base = Path(tempfile.mkdtemp(prefix="provider-router-pg-"))
    data = base / "data"
    try:
        if owner:
            shutil.chown(base, owner)
        subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **_as_owner(owner),
        )  # fmt: skip
        with open(data / "postgresql.conf", "a") as conf:
            for k, v in SETTINGS.items():
                conf.write(f"{k} = '{v}'\n")
            conf.write(f"unix_socket_directories = '{base}'\n")
        port = _start(bindir, data, base / "server.log", owner)
        yield Server("127.0.0.1", port, "postgres", bindir, data, owner)
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(
                [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **_as_owner(owner),
            )  # fmt: skip
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Server]:
    """One PostgreSQL server for the test session."""
    with running_server() as server:
        yield server


def _start(bindir: Path, data: Path, log: Path, owner: str | None) -> int:
    """Start the server on a free port (`pg_ctl -w` returns once it accepts connections);
    a port taken between choosing and binding it is tried again with another."""
    for _ in range(3):
        port = free_port()
        done = subprocess.run(
            [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", f"-p {port}", "start"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **_as_owner(owner),
        )  # fmt: skip
        if done.returncode == 0:
            return port
    raise RuntimeError(f"PostgreSQL did not start: {done.stderr.decode()}\n{log.read_text() if log.exists() else ''}")


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture
def pg_db(postgres: Server) -> Iterator[str]:
    """A new empty database on the session's server, dropped after the test: its DSN."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres.dsn(), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    yield postgres.dsn(name)
    with psycopg.connect(postgres.dsn(), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
