"""Per-node circuit breakers and the board that keeps a pool from ejecting all its nodes.

A :class:`Breaker` is a pure state machine over one node, driven by call outcomes and an
injected :class:`~spillway.clock.Clock`::

    CLOSED ──(5 consecutive failures, or ≥ 50 % failures over the last 20 calls
    │          once at least 10 are recorded; and the board agrees)──► OPEN
    │                                                                 │ open time passed,
    │                                                                 │ or mark_recovered()
    └◄──(half_open_probes successes in a row)── HALF_OPEN ◄───────────┘
                                                    │ any failure
                                                    └──► OPEN again, for longer

The CLOSED rules follow resilience4j's CircuitBreaker: a count-based sliding window of the
last N outcomes whose failure rate is judged only once it holds ``minimumNumberOfCalls``
outcomes, opening when the rate is equal to or above the threshold; HALF_OPEN admits a
bounded number of trial calls (``permittedNumberOfCallsInHalfOpenState``)
(https://resilience4j.readme.io/docs/circuitbreaker). The consecutive-failure rule and the
open time that grows with each ejection (``base_ejection_time`` * number of ejections, capped
by ``max_ejection_time``) follow Envoy's outlier detection
(https://envoyproxy.io/docs/envoy/v1.10.0/intro/arch_overview/outlier and
https://envoyproxy.io/docs/envoy/v1.22.7/api-v3/config/cluster/v3/outlier_detection.proto).

:class:`BreakerBoard` adds Envoy's ``max_ejection_percent``: a node may open only while its pool
keeps enough nodes in rotation, except that at least one host may always be ejected (Envoy
ejects a host at once when no host is ejected yet; gRPC adopted the same rule in
https://github.com/grpc/grpc-java/pull/9489). A one-node pool can therefore always be ejected,
which is what we want: its traffic spills to the next candidate (cloud) at once instead of
timing out against a dead node.

Outcomes are attributed to the state the breaker is in when they arrive. Every ``allow()`` that
returned True must be followed by exactly one of ``record_success``, ``record_failure`` or
``release``; otherwise a half-open probe slot leaks.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from spillway.clock import Clock


@dataclass(frozen=True)
class BreakerPolicy:
    """When a node's breaker opens, for how long, and how many nodes of a pool may be out."""

    consecutive_failures: int = 5
    failure_rate: float = 0.5
    #: the failure rate is judged over the last ``window`` call outcomes...
    window: int = 20
    #: ...and only once the window holds at least this many
    min_calls: int = 10
    open_base_s: float = 30.0
    open_max_s: float = 300.0
    half_open_probes: int = 3
    max_ejected_share: float = 0.5

    def __post_init__(self) -> None:
        checks = {
            "consecutive_failures must be at least 1": self.consecutive_failures >= 1,
            "failure_rate must be in (0, 1]": 0.0 < self.failure_rate <= 1.0,
            "window must be at least 1": self.window >= 1,
            "min_calls must be in 1..window": 1 <= self.min_calls <= self.window,
            "open_base_s must be positive": self.open_base_s > 0,
            "open_max_s must be at least open_base_s": self.open_max_s >= self.open_base_s,
            "half_open_probes must be in 1..3": 1 <= self.half_open_probes <= 3,
            "max_ejected_share must be in [0, 1]": 0.0 <= self.max_ejected_share <= 1.0,
        }
        for problem, ok in checks.items():
            if not ok:
                raise ValueError(f"BreakerPolicy: {problem}")

    def open_duration(self, openings: int) -> float:
        """Seconds to stay open after the ``openings``-th opening in a row (1-based)."""
        return min(self.open_base_s * max(1, openings), self.open_max_s)

    def max_ejected(self, pool_size: int) -> int:
        """How many of a pool's nodes may be out of rotation at once (never fewer than one)."""
        return max(1, math.floor(pool_size * self.max_ejected_share))


class BreakerState(StrEnum):
    """The three states of a breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerStats:
    """A snapshot of one breaker, for metrics and the admin API."""

    state: BreakerState
    consecutive_failures: int
    failure_share: float
    openings: int
    open_remaining_s: float
    probes_in_flight: int


def _always() -> bool:
    return True


class Breaker:
    """The circuit breaker of one node (see the module docstring for the state machine)."""

    def __init__(self, policy: BreakerPolicy, clock: Clock):
        self._policy = policy
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._window: deque[bool] = deque(maxlen=policy.window)  # True = failure
        self._window_failures = self._consecutive = self._openings = 0
        self._open_until = 0.0
        self._probes = self._probe_successes = 0

    @property
    def state(self) -> BreakerState:
        """The current state; an OPEN breaker whose open time has passed reads HALF_OPEN."""
        # Lazy: no timer task per node, the transition happens when someone looks.
        if self._state is BreakerState.OPEN and self._clock.monotonic() >= self._open_until:
            self._enter(BreakerState.HALF_OPEN)
        return self._state

    def allow(self) -> bool:
        """May a call go to this node now? In HALF_OPEN a True reserves a probe slot."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and self._probes < self._policy.half_open_probes:
            self._probes += 1
            return True
        return False

    def record_success(self) -> None:
        """A call to this node succeeded."""
        state = self.state
        if state is BreakerState.CLOSED:
            self._consecutive = 0
            self._push(failed=False)
        elif state is BreakerState.HALF_OPEN:
            self._free_probe()
            self._probe_successes += 1
            if self._probe_successes >= self._policy.half_open_probes:
                self._close()
        # OPEN: a late answer to a call admitted before the breaker opened proves little.

    def record_failure(self, may_open: Callable[[], bool] = _always) -> None:
        """A call to this node failed; ``may_open`` lets a board refuse the ejection."""
        state = self.state
        if state is BreakerState.HALF_OPEN:
            # The node is already out of rotation, so reopening ejects nobody new: no need
            # to ask the board.
            self._open()
        elif state is BreakerState.CLOSED:
            self._consecutive += 1
            self._push(failed=True)
            # A refusal leaves the breaker CLOSED with its counts, so the next failure asks again.
            if self._wants_open() and may_open():
                self._open()

    def release(self) -> None:
        """A call ended with no verdict on the node (cancelled, or the request's own fault)."""
        if self.state is BreakerState.HALF_OPEN:
            self._free_probe()

    def mark_recovered(self) -> None:
        """An active health probe succeeded: an OPEN breaker goes HALF_OPEN at once."""
        if self.state is BreakerState.OPEN:
            self._enter(BreakerState.HALF_OPEN)

    def stats(self) -> BreakerStats:
        """A frozen snapshot of this breaker."""
        state = self.state
        is_open = state is BreakerState.OPEN
        remaining = max(0.0, self._open_until - self._clock.monotonic()) if is_open else 0.0
        return BreakerStats(
            state=state,
            consecutive_failures=self._consecutive,
            failure_share=self._failure_share(),
            openings=self._openings,
            open_remaining_s=remaining,
            probes_in_flight=self._probes,
        )

    def _push(self, *, failed: bool) -> None:
        if len(self._window) == self._window.maxlen and self._window[0]:
            self._window_failures -= 1  # the oldest outcome, about to fall out, was a failure
        self._window.append(failed)
        self._window_failures += failed

    def _failure_share(self) -> float:
        return self._window_failures / len(self._window) if self._window else 0.0

    def _wants_open(self) -> bool:
        policy = self._policy
        if self._consecutive >= policy.consecutive_failures:
            return True
        return len(self._window) >= policy.min_calls and (
            self._failure_share() >= policy.failure_rate
        )

    def _free_probe(self) -> None:
        # Clamped: a late outcome of a call admitted in another state must not go negative.
        self._probes = max(0, self._probes - 1)

    def _open(self) -> None:
        self._openings += 1
        self._open_until = self._clock.monotonic() + self._policy.open_duration(self._openings)
        self._enter(BreakerState.OPEN)

    def _close(self) -> None:
        self._window.clear()
        self._window_failures = self._consecutive = self._openings = 0
        self._enter(BreakerState.CLOSED)

    def _enter(self, state: BreakerState) -> None:
        # Every transition starts a fresh round of probes.
        self._state = state
        self._probes = self._probe_successes = 0


class BreakerBoard:
    """The breakers of every node plus the pool rule: never eject too much of a pool.

    ``pools`` maps a model name to the names of the private nodes serving it. Cloud nodes get
    breakers too (created on first use, like any name) but belong to no pool, so nothing caps
    their ejection. A node in several pools may open only if every one of them allows it.
    """

    def __init__(
        self, policy: BreakerPolicy, clock: Clock, pools: Mapping[str, Sequence[str]]
    ) -> None:
        self._policy = policy
        self._clock = clock
        self._breakers: dict[str, Breaker] = {}
        self._pools_of: dict[str, list[tuple[str, ...]]] = {}
        for members in pools.values():
            pool = tuple(dict.fromkeys(members))  # a name listed twice is still one node
            for node in pool:
                self._pools_of.setdefault(node, []).append(pool)
                self._breaker(node)

    def allow(self, node: str) -> bool:
        """May a call go to ``node`` now? (Reserves a probe slot when half-open.)"""
        return self._breaker(node).allow()

    def record(self, node: str, ok: bool) -> None:
        """Record the verdict of one call to ``node``."""
        breaker = self._breaker(node)
        if ok:
            breaker.record_success()
        else:
            breaker.record_failure(lambda: self._may_eject(node))

    def release(self, node: str) -> None:
        """A call to ``node`` ended with no verdict; frees its probe slot if it held one."""
        self._breaker(node).release()

    def state(self, node: str) -> BreakerState:
        """The state of ``node``'s breaker."""
        return self._breaker(node).state

    def stats(self, node: str) -> BreakerStats:
        """A frozen snapshot of ``node``'s breaker."""
        return self._breaker(node).stats()

    def mark_recovered(self, node: str) -> None:
        """An active health probe of ``node`` succeeded."""
        self._breaker(node).mark_recovered()

    def open_nodes(self) -> list[str]:
        """Nodes whose breaker is OPEN now: what the active prober should check."""
        return [name for name, b in self._breakers.items() if b.state is BreakerState.OPEN]

    def _breaker(self, node: str) -> Breaker:
        breaker = self._breakers.get(node)
        if breaker is None:
            breaker = self._breakers[node] = Breaker(self._policy, self._clock)
        return breaker

    def _may_eject(self, node: str) -> bool:
        for pool in self._pools_of.get(node, ()):
            # HALF_OPEN nodes count as out: they take only a trickle of probe traffic.
            out = sum(1 for n in pool if n != node and self._is_out(n))
            if out + 1 > self._policy.max_ejected(len(pool)):
                return False
        return True

    def _is_out(self, node: str) -> bool:
        breaker = self._breakers.get(node)
        return breaker is not None and breaker.state is not BreakerState.CLOSED
