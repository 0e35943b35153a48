"""`providers.deadline`: what `asyncio.timeout` would do for the upstream calls, with one
timer for all the deadlines of an upstream."""

from __future__ import annotations

import asyncio

import pytest

from provider_router.providers.deadline import Deadlines


async def test_a_deadline_that_passes_ends_the_block_with_timeout_error() -> None:
    reached = False
    with pytest.raises(TimeoutError):
        with Deadlines().after(0.01):
            await asyncio.Event().wait()
            reached = True
    assert not reached
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    await asyncio.sleep(0)  # no cancellation left pending on the task


async def test_a_block_done_in_time_is_left_alone() -> None:
    with Deadlines().after(0.01):
        await asyncio.sleep(0)
    await asyncio.sleep(0.03)  # past the deadline: its timer went with the block


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    started = asyncio.Event()

    async def waits() -> None:
        with Deadlines().after(30):
            started.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(waits())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_reschedule_none_takes_the_deadline_off() -> None:
    loop = asyncio.get_running_loop()
    with Deadlines().after(None) as d:
        await asyncio.sleep(0.02)  # none yet
        d.reschedule(loop.time() + 0.01)
        d.reschedule(None)
        await asyncio.sleep(0.03)  # off again: the sleep ends as it should


async def test_rescheduled_expiry_leaves_the_block_as_timeout_error() -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError):
        with Deadlines().after(None) as d:
            d.reschedule(loop.time() + 0.01)
            await asyncio.Event().wait()


async def test_deadlines_sharing_a_timer_each_pass_at_their_own_time() -> None:
    """A shorter deadline set after a longer one passes first; the longer one is left
    alone meanwhile, and still passes at its own time."""
    deadlines = Deadlines()
    started = asyncio.Event()
    ended: dict[str, str] = {}

    async def waits(name: str, delay: float) -> None:
        try:
            with deadlines.after(delay):
                started.set()
                await asyncio.Event().wait()
        except TimeoutError:
            ended[name] = "timed out"
            raise

    long = asyncio.create_task(waits("long", 0.2))
    await started.wait()
    with pytest.raises(TimeoutError):
        await waits("short", 0.01)
    assert ended == {"short": "timed out"} and not long.done()
    with pytest.raises(TimeoutError):
        await long
    assert ended == {"short": "timed out", "long": "timed out"}


async def test_a_deadline_moved_later_does_not_pass_at_its_old_time() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines()
    with deadlines.after(None) as d:
        d.reschedule(loop.time() + 0.01)
        d.reschedule(loop.time() + 30)
        await asyncio.sleep(0.03)  # past the first time: the block goes on
    with pytest.raises(TimeoutError):
        with deadlines.after(0.01):  # the timer left for the old time does not stop a new one
            await asyncio.Event().wait()
