"""Waiting on a condition, for tests: the one place a test waits for something that gives it
no event to await (a row another process writes, a log line in a file, a metric, a lock's
queue). The check runs now and again after each short pause, and the wait is bounded: a
condition that never comes fails with what was awaited, never passes by time alone."""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any, Awaitable, Callable, TypeVar, Union

T = TypeVar("T")
WAIT = 30.0  # never reached when the code under test behaves
PAUSE = 0.01


async def until(check: Callable[[], Union[T, Awaitable[T]]], what: str, timeout: float = WAIT) -> T:
    """The first truthy result of `check()` (a function or a coroutine function)."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                value: Any = check()
                if inspect.isawaitable(value):
                    value = await value
                if value:
                    return value  # type: ignore[no-any-return]
                await asyncio.sleep(PAUSE)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}") from None


def until_sync(check: Callable[[], T], what: str, timeout: float = WAIT) -> T:
    """`until` for a test with no event loop (a synchronous browser driver)."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(PAUSE)  # sync-ok: between checks of the condition, as `until` does
    return value
