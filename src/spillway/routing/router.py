"""Which node answers a request now: private first by live load, cloud only for the excess.

For each attempt the router picks one node:

1. private nodes that serve the model, whose breaker admits a call, that have room (in-flight
   below ``max_concurrency`` and not *hot*), best score first;
2. otherwise cloud nodes with room, in configuration order (a spill);
3. otherwise nobody: the caller waits in the model's queue if some node is merely busy, or
   fails fast if every node is broken (breaker open, or a managed node's process down).

A ``private_only`` request never sees a cloud node, and may use a hot private node (its engine
queue is the only place it can wait besides ours).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from spillway.clock import Clock
from spillway.config.schema import LoadSignal, NodeKind, Timeouts
from spillway.errors import ModelNotFound, NoEligibleNode
from spillway.nodes.base import Node
from spillway.nodes.process_status import ProcessStatus, ProcessView
from spillway.nodes.signals import EngineLoad, MetricsSource
from spillway.nodes.tokens import TokenCounter
from spillway.resilience.breaker import BreakerBoard, BreakerState
from spillway.state.slots import Claim

#: Added to a node's score when its engine's KV cache is nearly full (new requests queue).
KV_FULL_PENALTY = 0.5
KV_FULL = 0.95


@dataclass
class NodeStats:
    """What spillway has learnt about one node; read by /admin/nodes and the ranking."""

    attempts: int = 0
    successes: int = 0
    failures: int = 0
    ttft_ewma_s: float | None = None
    engine: EngineLoad | None = None
    engine_at: float | None = None  # clock.monotonic() of the last good reading
    hot: bool = False  # its engine is queueing past the model's spill threshold


@dataclass(eq=False)
class NodeHandle:
    """A node as the router sees it: what it serves, its limits, and what it is doing."""

    name: str
    kind: NodeKind
    node: Node
    models: dict[str, str]
    max_concurrency: int
    weight: float
    timeouts: Timeouts
    counter: TokenCounter
    load_signal: LoadSignal = "none"
    #: where the engine's metrics are read, through the node's transport
    metrics: MetricsSource | None = None
    #: the smallest spill threshold among the models this node serves
    spill_wait_s: float = 5.0
    in_flight: int = 0
    stats: NodeStats = field(default_factory=NodeStats)
    #: called whenever a slot frees up (wakes requests waiting for capacity)
    on_release: list[Callable[[], None]] = field(default_factory=list)
    #: a node whose process spillway supervises (managed): what that process is doing
    process: ProcessView | None = None

    @property
    def private(self) -> bool:
        return self.kind == "private"

    def out_of_service(self) -> ProcessStatus | None:
        """The supervisor's status when it knows this node cannot serve (down, restarting)."""
        if self.process is None:
            return None
        status = self.process.status()
        return None if status.serving else status

    def acquire(
        self, fleet: Claim | None = None, on_release: Callable[[], None] | None = None
    ) -> Slot:
        """One more request in flight here. ``fleet``: the fleet-wide slot it also holds;
        ``on_release``: run when it ends (gives that slot back)."""
        self.in_flight += 1
        self.stats.attempts += 1
        return Slot(self, fleet, on_release)

    def engine_load(self, now: float, stale_s: float) -> EngineLoad | None:
        """The engine's own reading, or None when there is none or it is too old to trust."""
        at = self.stats.engine_at
        if self.stats.engine is None or at is None or now - at > stale_s:
            return None
        return self.stats.engine


class Slot:
    """One in-flight request on a node; ``release`` is idempotent."""

    __slots__ = ("_handle", "_on_release", "fleet")

    def __init__(
        self,
        handle: NodeHandle,
        fleet: Claim | None = None,
        on_release: Callable[[], None] | None = None,
    ):
        self._handle: NodeHandle | None = handle
        self._on_release = on_release
        #: the fleet-wide slot (and breaker probe) this request holds, with shared state
        self.fleet = fleet

    def release(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.in_flight -= 1
            if self._on_release is not None:
                self._on_release()
            for wake in handle.on_release:
                wake()


@dataclass(frozen=True, slots=True)
class Pick:
    """The router's answer: a node, or why there is none."""

    handle: NodeHandle | None
    #: no node now, but one is merely at capacity: waiting can help
    busy: bool = False


@dataclass
class ModelCounters:
    requests: int = 0
    spilled: int = 0


class Router:
    """Ranks and picks nodes per attempt. Bookkeeping only: it never does I/O."""

    def __init__(
        self,
        handles: Iterable[NodeHandle],
        board: BreakerBoard,
        clock: Clock,
        signal_stale_s: float,
    ):
        self.handles = list(handles)
        self.board = board
        self.clock = clock
        self.signal_stale_s = signal_stale_s
        self.counters: dict[str, ModelCounters] = {}
        self._by_model: dict[str, list[NodeHandle]] = {}
        for handle in self.handles:
            for model in handle.models:
                self._by_model.setdefault(model, []).append(handle)
                self.counters.setdefault(model, ModelCounters())

    def models(self) -> list[str]:
        return list(self._by_model)

    def knows(self, model: str) -> bool:
        return model in self._by_model

    def serving(self, model: str) -> list[NodeHandle]:
        handles = self._by_model.get(model)
        if not handles:
            raise ModelNotFound.named(model)
        return handles

    def eligible(self, model: str, private_only: bool) -> list[NodeHandle]:
        """The nodes this request may ever use: a private_only request sees no cloud node."""
        handles = self.serving(model)
        return [h for h in handles if h.private] if private_only else handles

    def check_eligible(self, model: str, private_only: bool) -> list[NodeHandle]:
        """The nodes this request may use; fail at once when the policy leaves none."""
        handles = self.eligible(model, private_only)
        if not handles:
            raise NoEligibleNode(
                f"No private node serves '{model}', and this API key is private_only, "
                "so the request was not sent to a cloud node."
            )
        return handles

    def pick(
        self,
        model: str,
        private_only: bool,
        exclude: Collection[str] = (),
        candidates: Collection[NodeHandle] | None = None,
    ) -> Pick:
        """``candidates``: ``eligible(model, private_only)``, when the caller has it already."""
        if candidates is None:
            candidates = self.eligible(model, private_only)
        handles = [h for h in candidates if h.name not in exclude]
        now = self.clock.monotonic()
        if len(handles) == 1:
            return self._pick_only(handles[0], now, private_only)
        usable = [
            h
            for h in handles
            if self.board.state(h.name) is not BreakerState.OPEN and h.out_of_service() is None
        ]
        private = sorted((h for h in usable if h.private), key=lambda h: self.score(h, now))
        cloud = [h for h in usable if not h.private]
        for handle in private:
            room = self._has_room(handle, now, ignore_hot=private_only)
            if room and self.board.allow(handle.name):
                return Pick(handle)
        for handle in cloud:  # configuration order: the operator's preference
            if self._has_room(handle, now, ignore_hot=True) and self.board.allow(handle.name):
                return Pick(handle)
        return Pick(None, busy=bool(private or cloud))

    def _pick_only(self, handle: NodeHandle, now: float, private_only: bool) -> Pick:
        """``pick`` for one candidate (one node per model is common): the same rules, with
        no ranking to do."""
        if self.board.state(handle.name) is BreakerState.OPEN or handle.out_of_service():
            return Pick(None)
        ignore_hot = private_only or not handle.private
        if self._has_room(handle, now, ignore_hot) and self.board.allow(handle.name):
            return Pick(handle)
        return Pick(None, busy=True)

    def score(self, handle: NodeHandle, now: float) -> tuple[float, float]:
        """Lower is better: load against the node's target, then its smoothed TTFT."""
        queued = 0.0
        penalty = 0.0
        engine = handle.engine_load(now, self.signal_stale_s)
        if engine is not None:
            queued = engine.waiting
            if engine.kv_usage is not None and engine.kv_usage >= KV_FULL:
                penalty = KV_FULL_PENALTY
        load = (handle.in_flight + queued) / handle.max_concurrency / handle.weight
        return load + penalty, handle.stats.ttft_ewma_s or 0.0

    def observe_ttft(self, handle: NodeHandle, seconds: float, smoothing: float) -> None:
        previous = handle.stats.ttft_ewma_s
        ewma = seconds if previous is None else previous + smoothing * (seconds - previous)
        handle.stats.ttft_ewma_s = ewma
        self._update_hot(handle)

    def observe_engine(self, handle: NodeHandle, load: EngineLoad | None) -> None:
        if load is not None:
            handle.stats.engine, handle.stats.engine_at = load, self.clock.monotonic()
        self._update_hot(handle)

    def _update_hot(self, handle: NodeHandle) -> None:
        """Hysteresis: hot above the spill threshold, cool again only below half of it."""
        engine = handle.engine_load(self.clock.monotonic(), self.signal_stale_s)
        ttft = handle.stats.ttft_ewma_s
        if engine is None or ttft is None or engine.waiting <= 0:
            handle.stats.hot = False  # no trustworthy queue: fall back to our own counts
        elif ttft > handle.spill_wait_s:
            handle.stats.hot = True
        elif ttft < handle.spill_wait_s / 2:
            handle.stats.hot = False

    def note_answer(self, model: str, handle: NodeHandle) -> None:
        counters = self.counters[model]
        counters.requests += 1
        if not handle.private:
            counters.spilled += 1

    def _has_room(self, handle: NodeHandle, now: float, ignore_hot: bool) -> bool:
        if handle.in_flight >= handle.max_concurrency:
            return False
        if ignore_hot or not handle.stats.hot:
            return True
        # A hot flag from a signal gone stale no longer counts: fall back to our own counts.
        return handle.engine_load(now, self.signal_stale_s) is None
