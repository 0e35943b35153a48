"""`providers.deadline.Deadline`: what `asyncio.timeout` would do for the upstream calls."""

from __future__ import annotations

import asyncio

import pytest

from provider_router.providers.deadline import Deadline


async def test_a_deadline_that_passes_ends_the_block_with_timeout_error() -> None:
    reached = False
    with pytest.raises(TimeoutError):
        with Deadline(0.01):
            await asyncio.Event().wait()
            reached = True
    assert not reached
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    await asyncio.sleep(0)  # no cancellation left pending on the task


async def test_a_block_done_in_time_is_left_alone() -> None:
    with Deadline(0.01):
        await asyncio.sleep(0)
    await asyncio.sleep(0.03)  # past the deadline: its timer went with the block


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    started = asyncio.Event()

    async def waits() -> None:
        with Deadline(30):
            started.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(waits())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_reschedule_none_takes_the_deadline_off() -> None:
    loop = asyncio.get_running_loop()
    with Deadline(None) as d:
        await asyncio.sleep(0.02)  # none yet
        d.reschedule(loop.time() + 0.01)
        d.reschedule(None)
        await asyncio.sleep(0.03)  # off again: the sleep ends as it should


async def test_rescheduled_expiry_leaves_the_block_as_timeout_error() -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError):
        with Deadline(None) as d:
            d.reschedule(loop.time() + 0.01)
            await asyncio.Event().wait()
