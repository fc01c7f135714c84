"""Retry timing and the retry budget that stops retries from multiplying an outage.

:class:`RetryPolicy` says how often and how long to wait: at most ``max_attempts`` attempts for
one request across all nodes (the first attempt included), with "full jitter" backoff (a delay
drawn uniformly from zero up to an exponentially growing, capped ceiling), so that many
clients failing together do not retry together. A node's ``Retry-After`` is honoured only when
it fits inside the request's remaining deadline; otherwise waiting would be pointless and the
router should move to another node (or give up) at once.

:class:`RetryBudget` caps retries at a fraction of real traffic, so that when a fleet is down
every client retrying does not multiply the load on it. Two gates, both of which must pass:

* Envoy's retry budget (``circuit_breakers.thresholds.retry_budget``): retries in flight may be
  at most ``budget_percent`` of the active requests (default 20 %), but never capped below
  ``min_retry_concurrency`` (default 3) so a quiet gateway can still retry
  (https://www.envoyproxy.io/docs/envoy/v1.39.0/api-v3/config/cluster/v3/circuit_breaker.proto).
* Finagle's ``RetryBudget``: every request deposits ``percentCanRetry`` of a token, every retry
  withdraws a whole one, and a reserve lets clients that have just started retry at all
  (https://twitter.github.io/finagle/docs/com/twitter/finagle/service/RetryBudget$.html; tower's
  ``retry::budget::Budget`` is the same design). Finagle's deposits expire after a TTL; ours
  are pure and clock-free, so instead the balance is capped at ``burst``: an idle hour cannot
  bank an hour of retries.

Over any run, retries ≤ ``ratio`` * requests + the starting reserve, and the reserve is at most
``burst``.

Across replicas the ratio holds by itself: each replica's deposits come from its own requests,
so the fleet's retries stay within ``ratio`` of the fleet's requests. Only the reserve and the
floor would multiply with the replica count, so with shared state each replica keeps
``burst / replicas`` and ``min_retries / replicas`` of them (``parts``, at least 1 each).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime

# Floats drift (ten deposits of 0.1 sum to 0.9999…): that close to a whole token counts as one.
_EPSILON = 1e-9
# 2**63 * any sane base is far past any cap; clamping the exponent avoids float overflow.
_MAX_EXPONENT = 63


@dataclass(frozen=True)
class RetryPolicy:
    """How many attempts one request may make and how long to wait between them."""

    max_attempts: int = 3
    base_s: float = 0.05
    cap_s: float = 1.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("RetryPolicy: max_attempts must be at least 1")
        if self.base_s < 0 or self.cap_s < 0:
            raise ValueError("RetryPolicy: base_s and cap_s must not be negative")

    def delay_for(self, retry: int, rand: Callable[[], float]) -> float:
        """Full-jitter backoff before the ``retry``-th retry (1 = the first retry).

        ``rand`` returns a float in [0, 1) (``random.random``); the delay is uniform in
        [0, min(cap_s, base_s * 2**(retry-1))].
        """
        if retry < 1:
            raise ValueError(f"retry counts from 1, got {retry}")
        ceiling = min(self.cap_s, self.base_s * 2.0 ** min(retry - 1, _MAX_EXPONENT))
        return rand() * ceiling

    def retry_after_fits(self, retry_after_s: float | None, remaining_s: float) -> bool:
        """May the node's ``Retry-After`` be honoured with ``remaining_s`` left to the deadline?

        It fits only when waiting it out still leaves time for the attempt itself (strictly
        less than the remaining time). No ``Retry-After`` asks for no wait and always fits.
        """
        if retry_after_s is None:
            return True
        return retry_after_s < remaining_s


def parse_retry_after(value: str | None, now_wall: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP-date.

    ``now_wall`` is the wall clock (``Clock.wall()``) for the date form; a date already past
    means "now" (0.0). Absent, unparsable, negative or non-finite values give None.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    seconds = _parse_seconds(text)
    if seconds is not None:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" parses naive; HTTP-dates are always GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now_wall)


def _parse_seconds(text: str) -> float | None:
    # RFC 9110 says whole seconds; fractions are accepted because some servers send them.
    if not (text[0].isdigit() or text[0] in "+-."):
        return None
    try:
        return float(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class RetryBudgetStats:
    """A snapshot of a retry budget, for metrics."""

    requests_in_flight: int
    retries_in_flight: int
    balance: float
    retries_granted: int
    retries_refused: int


class RetryBudget:
    """Allows retries only while they stay a small share (``ratio``) of real requests.

    Call ``request_started()`` / ``request_finished()`` around every client request (not per
    attempt), and ``try_retry()`` before each retry; when it returns True the retry is
    reserved and must be followed by ``retry_finished()``.
    """

    def __init__(
        self,
        ratio: float = 0.2,
        min_retries: int = 3,
        burst: int = 10,
        parts: Callable[[], int] = lambda: 1,
    ):
        if ratio < 0 or min_retries < 0 or burst < 0:
            raise ValueError("RetryBudget: ratio, min_retries and burst must not be negative")
        self._ratio = ratio
        self._min_retries_whole = min_retries
        self._burst_whole = burst
        self._parts = parts
        # Start full: a gateway that has just started (or restarted into an incident) can still
        # fail over a burst of requests before deposits have built up.
        self._balance = float(self._burst)
        self._requests = 0
        self._retries = 0
        self._granted = 0
        self._refused = 0

    @property
    def _burst(self) -> int:
        return max(1, self._burst_whole // max(1, self._parts())) if self._burst_whole else 0

    @property
    def _min_retries(self) -> int:
        whole = self._min_retries_whole
        return max(1, whole // max(1, self._parts())) if whole else 0

    def request_started(self) -> None:
        """A client request began: it counts as in flight and deposits ``ratio`` of a token."""
        self._requests += 1
        self._balance = min(float(self._burst), self._balance + self._ratio)

    def request_finished(self) -> None:
        """A client request ended, however it ended."""
        self._requests = max(0, self._requests - 1)

    def try_retry(self) -> bool:
        """Reserve one retry if both gates pass; False means: do not retry, fail or fall back."""
        self._balance = min(self._balance, float(self._burst))  # the replicas may have grown
        concurrency_limit = max(float(self._min_retries), self._ratio * self._requests)
        if self._retries < concurrency_limit and self._balance >= 1.0 - _EPSILON:
            self._retries += 1
            self._balance = max(0.0, self._balance - 1.0)
            self._granted += 1
            return True
        self._refused += 1
        return False

    def retry_finished(self) -> None:
        """A retry reserved by ``try_retry()`` ended."""
        self._retries = max(0, self._retries - 1)

    def stats(self) -> RetryBudgetStats:
        """A frozen snapshot of the budget."""
        return RetryBudgetStats(
            requests_in_flight=self._requests,
            retries_in_flight=self._retries,
            balance=self._balance,
            retries_granted=self._granted,
            retries_refused=self._refused,
        )
