"""A deadline on the current task, as a plain (synchronous) context manager: every upstream
call takes one (the first byte; the idle time between pieces of a body).

It does what `asyncio.timeout` does for this use (past the deadline the task is cancelled,
and the cancellation leaves the block as `TimeoutError`; a cancellation from elsewhere
stays one), without its two coroutines and state machine: on the 2-core bench box
`asyncio.timeout` cost about 4.8 us per call against 1.4 us for a timer handle alone, and
the proxy's c=1 latency showed it (bench/README.md).
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class Deadline:
    """`with Deadline(seconds):` in a task; `None`: no deadline until `reschedule`."""

    __slots__ = ("_delay", "_loop", "_task", "_handle", "_expired", "_cancelling")

    def __init__(self, delay: float | None) -> None:
        self._delay = delay
        self._handle: asyncio.TimerHandle | None = None
        self._expired = False

    def __enter__(self) -> Deadline:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a Deadline is used inside a task")
        self._task = task
        self._loop = asyncio.get_running_loop()
        self._cancelling = task.cancelling()
        if self._delay is not None:
            self._handle = self._loop.call_at(self._loop.time() + self._delay, self._expire)
        return self

    def reschedule(self, when: float | None) -> None:
        """Move the deadline to `when` (the loop's clock), or take it off (None)."""
        if self._handle is not None:
            self._handle.cancel()
        self._handle = None if when is None or self._expired else self._loop.call_at(when, self._expire)

    def _expire(self) -> None:
        self._handle = None
        self._expired = True
        self._task.cancel()

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        # Ours if the deadline passed and no one else cancelled the task meanwhile.
        if self._expired and self._task.uncancel() <= self._cancelling and kind is asyncio.CancelledError:
            raise TimeoutError from e
