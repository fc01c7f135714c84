"""Whether a batch may spill to cloud nodes: only when private capacity alone would miss its
completion window, and never for a ``private_only`` key.

The estimate is the better of two rates: this run's over the last minute, and over its whole
life. The remaining lines at that rate, with a quarter more for safety and ``MARGIN_S`` for
the finishing, must fit in the time left. Until a minute of evidence exists, and while the
fleet finishes nothing at all (down, or all taken by interactive work), the answer is no
until the window's last tenth: a busy hour must not send a day's batch to the cloud.
"""

from __future__ import annotations

from collections import deque
from datetime import datetime

from spillway.batch.records import BatchRecord
from spillway.clock import Clock

RATE_WINDOW_S = 60.0
MARGIN_S = 30.0
SAFETY = 1.25
#: how long one answer is reused: the question is asked for every line started
CACHE_S = 1.0


class Pace:
    def __init__(self, record: BatchRecord, clock: Clock, private_only: bool):
        self.total = record.total
        self.done = record.completed + record.failed
        self._expires = record.expires_at
        self._created = record.times["created_at"] or record.expires_at
        self._clock = clock
        self._private_only = private_only
        self._started = clock.monotonic()
        self._finished: deque[float] = deque()
        self._ran = 0  # lines this run finished
        self._answer = (False, -CACHE_S)

    def finished(self) -> None:
        self.done += 1
        self._ran += 1
        if not self._private_only:
            now = self._clock.monotonic()
            self._finished.append(now)
            self._forget(now)

    def may_spill(self) -> bool:
        if self._private_only:
            return False
        now = self._clock.monotonic()
        answer, at = self._answer
        if now - at < CACHE_S:
            return answer
        answer = self._judge(now)
        self._answer = (answer, now)
        return answer

    def _judge(self, now: float) -> bool:
        remaining = self.total - self.done
        if remaining <= 0:
            return False
        wall = datetime.fromtimestamp(self._clock.wall(), self._expires.tzinfo)
        left = (self._expires - wall).total_seconds()
        last_tenth = left < (self._expires - self._created).total_seconds() / 10
        self._forget(now)
        elapsed = now - self._started
        if elapsed < RATE_WINDOW_S:
            return last_tenth  # too little evidence yet
        rate = max(len(self._finished) / RATE_WINDOW_S, self._ran / elapsed)
        if rate == 0:
            return last_tenth
        return remaining / rate * SAFETY + MARGIN_S > left

    def _forget(self, now: float) -> None:
        while self._finished and self._finished[0] < now - RATE_WINDOW_S:
            self._finished.popleft()
