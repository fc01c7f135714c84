"""A bounded FIFO of requests waiting for capacity on one model.

When every node serving a model is at its concurrency target, a request may wait a little for
a slot instead of failing or spilling at once. :class:`WaitQueue` holds those waiters:

* bounded: when ``maxsize`` requests already wait, the next one is refused at once with
  :class:`~spillway.errors.QueueFull` (429 + ``Retry-After``), because a long queue only turns
  overload into timeouts;
* FIFO: ``notify()`` (one slot freed) wakes exactly the oldest waiter still waiting;
* deadline-aware: a waiter gives up when the request's own deadline passes
  (:class:`~spillway.errors.DeadlineExceeded`);
* no lost wake-ups: a waiter cancelled (client gone) or timed out *after* being woken hands the
  wake-up to the next waiter, so a freed slot is never left unclaimed.

A ``notify()`` with nobody waiting is dropped, not remembered. The queue does not own the
capacity; the caller does, and always re-checks it before waiting (and after waking, since
another request may have taken the slot first). A remembered wake-up would let a later request
skip that check's verdict and jump ahead of the capacity it represents.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from spillway.clock import Clock
from spillway.errors import DeadlineExceeded, QueueFull


class WaitQueue:
    """Requests waiting, oldest first, for a slot on one model (see the module docstring)."""

    def __init__(
        self, maxsize: int, clock: Clock, *, model: str = "", retry_after_s: int = 1
    ) -> None:
        if maxsize < 0:
            raise ValueError("WaitQueue: maxsize must not be negative")
        self._maxsize = maxsize
        self._clock = clock
        self._subject = f"model '{model}'" if model else "this model"
        self._retry_after_s = retry_after_s
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        """How many requests wait now (woken ones no longer count)."""
        return sum(1 for w in self._waiters if not w.done())

    @property
    def maxsize(self) -> int:
        """The most requests that may wait at once (0: never wait)."""
        return self._maxsize

    async def wait(self, deadline: float) -> None:
        """Wait until ``notify()`` picks this request, or fail at ``deadline`` (monotonic).

        Raises :class:`~spillway.errors.QueueFull` at once when the queue is full, and
        :class:`~spillway.errors.DeadlineExceeded` when the deadline passes first (at once when
        it has already passed).
        """
        if self.waiting >= self._maxsize:
            raise QueueFull(
                f"{self._maxsize} requests already wait for capacity on {self._subject}; "
                "retry shortly",
                retry_after_s=self._retry_after_s,
            )
        remaining = deadline - self._clock.monotonic()
        if remaining <= 0:
            raise self._deadline_error()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            # asyncio.timeout runs on loop time, so the budget is converted to a relative delay
            # read from the injected clock: correct with SystemClock, instant with a past
            # deadline under ManualClock.
            async with asyncio.timeout(remaining):
                await waiter
        except TimeoutError:
            self._abandon(waiter)
            raise self._deadline_error() from None
        except BaseException:  # cancelled: the client went away
            self._abandon(waiter)
            raise

    def notify(self) -> None:
        """One slot was freed: wake the oldest waiter still waiting (dropped if none)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():  # skip waiters cancelled but not yet cleaned up
                waiter.set_result(None)
                return

    def notify_all(self) -> None:
        """Wake every waiter (e.g. capacity grew, or the model is shutting down)."""
        while self._waiters:
            self.notify()

    def _abandon(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done() and not waiter.cancelled():
            # Woken, but a cancellation or the deadline won the race: nobody will use the
            # freed slot, so the wake-up passes to the next waiter.
            self.notify()
            return
        waiter.cancel()
        with contextlib.suppress(ValueError):  # notify() may have dropped it already
            self._waiters.remove(waiter)

    def _deadline_error(self) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"request waited for capacity on {self._subject} until the deadline; "
            "raise the deadline or the model's capacity"
        )
