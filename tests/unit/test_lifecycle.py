"""cancel_and_wait: stopping background tasks that may swallow a cancel; stop_requested: the stop
signals caught from the moment it returns."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from scalellm.lifecycle import cancel_and_wait, stop_requested


async def _swallows_first_cancel(cancels_seen: list[int]) -> None:
    """What a Python 3.11 asyncio.wait_for does when a cancel races the completion it waits on."""
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        cancels_seen.append(1)
        asyncio.current_task().uncancel()  # type: ignore[union-attr]
    await asyncio.sleep(60)  # the loop runs on


async def test_a_swallowed_cancel_is_repeated_until_the_task_ends() -> None:
    cancels_seen: list[int] = []
    task = asyncio.create_task(_swallows_first_cancel(cancels_seen))
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(task, retry_s=0.01), timeout=60)  # a hang guard only
    assert task.cancelled()
    assert cancels_seen == [1]


async def test_a_single_cancel_is_not_enough_for_such_a_task() -> None:
    """The failure cancel_and_wait exists for: cancel() once, and the task never ends."""
    cancels_seen: list[int] = []
    task = asyncio.create_task(_swallows_first_cancel(cancels_seen))
    await asyncio.sleep(0)
    task.cancel()
    while not cancels_seen:  # the cancel was delivered and swallowed
        await asyncio.sleep(0)
    for _ in range(10):  # and the task went back to sleep instead of ending
        await asyncio.sleep(0)
    assert not task.done()
    await cancel_and_wait(task)
    assert task.cancelled()


async def test_done_and_failed_tasks_are_waited_for_and_their_errors_dropped() -> None:
    async def fails() -> None:
        raise ValueError("boom")

    failed = asyncio.create_task(fails())
    finished = asyncio.create_task(asyncio.sleep(0))
    sleeping = asyncio.create_task(asyncio.sleep(60))
    await asyncio.wait({failed, finished})
    await cancel_and_wait(failed, finished, sleeping)
    assert failed.done() and finished.done() and sleeping.cancelled()
    with pytest.raises(ValueError):
        failed.result()


async def test_nothing_to_cancel_returns_without_suspending() -> None:
    """No task, or only finished ones: it returns on its first step, never yielding to the loop."""
    done = asyncio.get_running_loop().create_future()
    done.set_result(None)
    for tasks in ((), (done,)):
        step = cancel_and_wait(*tasks).__await__()
        with pytest.raises(StopIteration):
            next(step)


async def test_a_stop_signal_right_after_stop_requested_sets_the_event_instead_of_killing() -> None:
    """What a service relies on when it prints READY just after: SIGTERM sent before the loop
    runs again (no await in between) is already handled. Without the handler in place the default
    action would end this test process."""
    stopping = stop_requested()
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(stopping.wait(), timeout=10)
    assert stopping.is_set()
