"""Deadlines on tasks, as plain (synchronous) context managers: every upstream call takes
one (the first byte; the idle time between pieces of a body).

A deadline does what `asyncio.timeout` does for this use (past the deadline the task is
cancelled, and the cancellation leaves the block as `TimeoutError`; a cancellation from
elsewhere stays one), without its two coroutines and state machine, and without a timer
of its own: an upstream's deadlines (`Deadlines`) share one timer, set for the earliest of
them and moved only when a new one is earlier. Setting, moving or ending a deadline is a
dict entry; most end long before they pass, so the timer fires about once per deadline
length, not once per call or stream piece. On the 2-core bench box a timer handle set and
cancelled cost 2.4 us under uvloop, `asyncio.timeout` 7 us (bench/README.md).
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType

# A timer may fire this much before its time (uvloop counts in milliseconds): what is due
# within it counts as due, rather than the timer being set again for a moment later.
_EARLY_S = 0.001


class Deadlines:
    """The deadlines of one owner's calls (an upstream's), kept by one timer."""

    __slots__ = ("_due", "_timer", "_timer_at", "_loop")

    def __init__(self) -> None:
        self._due: dict[Deadline, float] = {}  # each live deadline, and when it passes (the loop's clock)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._loop: asyncio.AbstractEventLoop | None = None  # the timer's

    def after(self, delay: float | None) -> Deadline:
        """`with deadlines.after(seconds):` in a task; `None`: none until `reschedule`."""
        return Deadline(self, delay)

    def _set(self, d: Deadline, when: float) -> None:
        self._due[d] = when
        if when < self._timer_at or d._loop is not self._loop:  # (a timer of a loop gone is no timer)
            if self._timer is not None:
                self._timer.cancel()
            self._loop = d._loop
            self._timer_at = when
            self._timer = d._loop.call_at(when, self._fire)

    def _clear(self, d: Deadline) -> None:
        self._due.pop(d, None)

    def _fire(self) -> None:
        loop = self._loop
        assert loop is not None
        self._timer, self._timer_at = None, math.inf
        now = loop.time() + _EARLY_S
        passed = [d for d, when in self._due.items() if when <= now]
        for d in passed:
            del self._due[d]
            d._expire()
        if self._due:
            when = min(self._due.values())
            self._timer_at = when
            self._timer = loop.call_at(when, self._fire)


class Deadline:
    """One deadline on the current task (`Deadlines.after`)."""

    __slots__ = ("_owner", "_delay", "_loop", "_task", "_expired", "_cancelling")

    def __init__(self, owner: Deadlines, delay: float | None) -> None:
        self._owner = owner
        self._delay = delay
        self._expired = False

    def __enter__(self) -> Deadline:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a Deadline is used inside a task")
        self._task = task
        self._loop = task.get_loop()  # not `get_running_loop()`: under Python 3.11 each call is a getpid() system call
        self._cancelling = task.cancelling()
        if self._delay is not None:
            self._owner._set(self, self._loop.time() + self._delay)
        return self

    def reschedule(self, when: float | None) -> None:
        """Move the deadline to `when` (the loop's clock), or take it off (None)."""
        if when is None or self._expired:
            self._owner._clear(self)
        else:
            self._owner._set(self, when)

    def _expire(self) -> None:
        self._expired = True
        self._task.cancel()

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._owner._clear(self)
        # Ours if the deadline passed and no one else cancelled the task meanwhile.
        if self._expired and self._task.uncancel() <= self._cancelling and kind is asyncio.CancelledError:
            raise TimeoutError from e
