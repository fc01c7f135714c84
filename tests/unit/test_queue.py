"""The bounded FIFO wait queue: order, bounds, deadlines, cancellation, no lost wake-ups."""

from __future__ import annotations

import asyncio

import pytest

from spillway.clock import ManualClock, SystemClock
from spillway.errors import DeadlineExceeded, QueueFull
from spillway.resilience.queue import WaitQueue

FAR = 3600.0  # seconds: a deadline no test reaches


async def settle() -> None:
    """Let every ready task run until it blocks (yields to the loop, never sleeps)."""
    for _ in range(10):
        await asyncio.sleep(0)


def waiter(queue: WaitQueue, clock: ManualClock, log: list[str], name: str) -> asyncio.Task[None]:
    async def run() -> None:
        await queue.wait(clock.monotonic() + FAR)
        log.append(name)

    return asyncio.create_task(run(), name=name)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


async def test_notify_wakes_waiters_in_arrival_order(clock: ManualClock) -> None:
    queue = WaitQueue(10, clock)
    log: list[str] = []
    tasks = [waiter(queue, clock, log, name) for name in "abc"]
    await settle()
    assert queue.waiting == 3 and log == []
    queue.notify()
    await settle()
    assert log == ["a"] and queue.waiting == 2
    queue.notify()
    queue.notify()
    await asyncio.gather(*tasks)
    assert log == ["a", "b", "c"] and queue.waiting == 0


async def test_a_full_queue_refuses_at_once(clock: ManualClock) -> None:
    queue = WaitQueue(2, clock, model="glm-5", retry_after_s=3)
    log: list[str] = []
    tasks = [waiter(queue, clock, log, name) for name in "ab"]
    await settle()
    with pytest.raises(QueueFull) as caught:
        await queue.wait(clock.monotonic() + FAR)
    error = caught.value
    assert error.status == 429 and error.code == "queue_full"
    assert error.kind == "rate_limit_error"
    assert error.retry_after_s == 3 and not error.may_fall_back
    assert "glm-5" in error.message and "2 requests" in error.message
    assert queue.waiting == 2
    queue.notify_all()
    await asyncio.gather(*tasks)


async def test_maxsize_zero_never_queues(clock: ManualClock) -> None:
    with pytest.raises(QueueFull):
        await WaitQueue(0, clock).wait(clock.monotonic() + FAR)


def test_negative_maxsize_is_refused(clock: ManualClock) -> None:
    with pytest.raises(ValueError, match="maxsize"):
        WaitQueue(-1, clock)


async def test_a_woken_waiter_frees_its_place_at_once(clock: ManualClock) -> None:
    queue = WaitQueue(1, clock)
    log: list[str] = []
    first = waiter(queue, clock, log, "a")
    await settle()
    queue.notify()  # "a" is woken but has not run yet
    assert queue.waiting == 0
    second = waiter(queue, clock, log, "b")
    await settle()
    assert log == ["a"] and queue.waiting == 1
    queue.notify()
    await asyncio.gather(first, second)


async def test_a_past_deadline_fails_at_once(clock: ManualClock) -> None:
    queue = WaitQueue(5, clock)
    with pytest.raises(DeadlineExceeded, match="waited for capacity") as caught:
        await queue.wait(clock.monotonic())
    assert caught.value.status == 504 and caught.value.code == "deadline_exceeded"
    clock.advance(10.0)
    with pytest.raises(DeadlineExceeded):
        await queue.wait(clock.monotonic() - 1.0)
    assert queue.waiting == 0


async def test_the_deadline_ends_the_wait(clock: ManualClock) -> None:
    queue = WaitQueue(5, clock)
    log: list[str] = []
    later = waiter(queue, clock, log, "later")
    await settle()
    with pytest.raises(DeadlineExceeded):
        await queue.wait(clock.monotonic() + 0.01)  # a 10 ms real timeout
    assert queue.waiting == 1
    queue.notify()  # the timed-out waiter is gone: the wake-up reaches "later"
    await later
    assert log == ["later"]


async def test_a_cancelled_waiter_leaves_cleanly(clock: ManualClock) -> None:
    queue = WaitQueue(5, clock)
    log: list[str] = []
    gone, stays = waiter(queue, clock, log, "gone"), waiter(queue, clock, log, "stays")
    await settle()
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert queue.waiting == 1
    queue.notify()
    await stays
    assert log == ["stays"]


async def test_cancelling_a_woken_waiter_passes_the_wake_up_on(clock: ManualClock) -> None:
    queue = WaitQueue(5, clock)
    log: list[str] = []
    tasks = [waiter(queue, clock, log, name) for name in "abc"]
    await settle()
    queue.notify()  # wakes "a"...
    tasks[0].cancel()  # ...which is cancelled before it can use the slot
    await settle()
    assert tasks[0].cancelled()
    assert log == ["b"] and queue.waiting == 1  # "b" got the slot; "c" still waits
    queue.notify()
    await tasks[2]
    assert log == ["b", "c"]


async def test_a_notify_with_nobody_waiting_is_dropped(clock: ManualClock) -> None:
    queue = WaitQueue(5, clock)
    queue.notify()
    queue.notify_all()
    log: list[str] = []
    task = waiter(queue, clock, log, "a")
    await settle()
    assert not task.done() and queue.waiting == 1  # no stored wake-up let it through
    queue.notify()
    await task


async def test_notify_all_wakes_everyone(clock: ManualClock) -> None:
    queue = WaitQueue(5, clock)
    log: list[str] = []
    tasks = [waiter(queue, clock, log, name) for name in "abcd"]
    await settle()
    queue.notify_all()
    assert queue.waiting == 0
    await asyncio.gather(*tasks)
    assert log == ["a", "b", "c", "d"]


async def test_notify_skips_a_cancelled_waiter_not_yet_cleaned_up(clock: ManualClock) -> None:
    queue = WaitQueue(5, clock)
    log: list[str] = []
    tasks = [waiter(queue, clock, log, name) for name in "ab"]
    await settle()
    tasks[0].cancel()  # its future is cancelled now, its cleanup runs later
    queue.notify()
    await settle()
    assert log == ["b"] and tasks[0].cancelled() and queue.waiting == 0


async def test_works_with_the_system_clock() -> None:
    clock = SystemClock()
    queue = WaitQueue(1, clock)
    task = asyncio.create_task(queue.wait(clock.monotonic() + FAR))
    await settle()
    queue.notify()
    await task
    with pytest.raises(DeadlineExceeded):
        await queue.wait(clock.monotonic() + 0.005)
    assert queue.maxsize == 1 and queue.waiting == 0
