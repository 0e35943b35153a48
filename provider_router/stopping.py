"""How the daemon stops: the signals that stop it, and the watchdog that ends the process
if stopping itself hangs.

The first SIGTERM, SIGINT or SIGHUP stops it gracefully; the second ends the grace period;
later ones are only logged. The watchdog is armed as stopping starts, so no path leaves a
process alive that no longer serves.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Callable

import structlog

log = structlog.get_logger("provider_router")

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# After the grace: closing connections, then the log writer committing what is queued.
FLUSH_SECONDS = 30.0
# After a second signal (or a failed start): the same, in a hurry.
HURRY_SECONDS = 5.0
EXIT_FORCED = 70  # EX_SOFTWARE: it had to be ended by the watchdog


class Watchdog:
    """Ends the process at a deadline unless it has exited by then. Armed when stopping
    starts: a cleanup step that hangs (a thread that never ends, a lock never granted) must
    not leave a daemon that serves nothing and ignores signals. A daemon thread, so it
    never holds up a normal exit."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._why = ""
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float, why: str) -> None:
        """End the process in `seconds` at the latest (an earlier deadline wins)."""
        with self._cond:
            deadline = time.monotonic() + seconds
            if self._deadline is None or deadline < self._deadline:
                self._deadline, self._why = deadline, why
            self._cond.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="shutdown-watchdog", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        with self._cond:
            while True:
                assert self._deadline is not None
                left = self._deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        log.error("shutdown_forced", reason=self._why, hint="records not yet committed are lost; see the lines before")
        os._exit(EXIT_FORCED)


class Signals:
    """SIGTERM, SIGINT, SIGHUP: the first stops gracefully, the second ends the grace."""

    def __init__(self, grace: float, watchdog: Watchdog) -> None:
        self.grace = grace
        self.watchdog = watchdog
        self.stop = asyncio.Event()
        self.count = 0
        self.hurry: Callable[[], None] = lambda: None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in SIGNALS:
            loop.add_signal_handler(sig, self._received, sig)

    def parent_gone(self) -> None:
        """A worker's parent (`serve --workers N`) died: stop gracefully, as on a signal."""
        if self.count == 0:
            self.count = 1
            log.warning("parent_gone", action="stopping gracefully", grace_seconds=self.grace)
            self.watchdog.arm(self.grace + FLUSH_SECONDS, "parent gone: stopping took longer than the grace and the log flush")
            self.stop.set()

    def _received(self, sig: int) -> None:
        self.count += 1
        name = signal.Signals(sig).name
        if self.count == 1:
            log.info("signal_received", signal=name, action="stopping gracefully", grace_seconds=self.grace)
            self.watchdog.arm(self.grace + FLUSH_SECONDS, f"{name}: stopping took longer than the grace and the log flush")
            self.stop.set()
        elif self.count == 2:
            log.warning("signal_received", signal=name, action="grace ended: in-flight requests are ended now")
            self.watchdog.arm(HURRY_SECONDS, f"second signal ({name}): stopping did not finish in time")
            self.stop.set()
            self.hurry()
        else:
            log.warning("signal_received", signal=name, action="already stopping", exits_within_seconds=HURRY_SECONDS)
