"""The dispatcher end to end over scripted in-memory nodes: fallback, retries, capacity, streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal

import orjson
import pytest

from spillway.clock import ManualClock
from spillway.config.schema import NodeKind, Timeouts
from spillway.errors import (
    DeadlineExceeded,
    NoEligibleNode,
    QueueFull,
    UpstreamConnectError,
    UpstreamError,
    UpstreamRejected,
    UpstreamsExhausted,
    UpstreamStatusError,
    UpstreamTimeout,
)
from spillway.nodes.base import Reply
from spillway.nodes.tokens import EstimatingCounter
from spillway.resilience.breaker import BreakerBoard, BreakerPolicy, BreakerState
from spillway.resilience.queue import WaitQueue
from spillway.resilience.retry import RetryBudget, RetryPolicy
from spillway.routing.dispatch import Dispatcher, OpenStream, RequestContext
from spillway.routing.router import NodeHandle, Router
from spillway.state.redis import StateDown
from spillway.state.slots import Claim
from spillway.wire.requests import ChatRequest, parse_chat, parse_embeddings
from spillway.wire.sse import SseEvent

Fault = Callable[[str], UpstreamError]
Mode = Literal["complete", "stream"]
MODES: list[Mode] = ["complete", "stream"]

RAND = 0.5
RETRY = RetryPolicy(max_attempts=3, base_s=0.4, cap_s=10.0)
CHUNK = SseEvent(b'{"choices":[{"index":0,"delta":{"content":"hi"}}]}')
DONE = SseEvent(b"[DONE]")
# Many failures in a row without ejecting anybody, for tests about retries rather than breakers.
PATIENT = BreakerPolicy(consecutive_failures=100, window=100, min_calls=100)


def http(status: int, retry_after: str | None = None) -> Fault:
    return lambda name: UpstreamStatusError(name, status, "boom", retry_after=retry_after)


def rejected(name: str) -> UpstreamError:
    return UpstreamRejected(name, 400, "messages[0] is not valid", param="messages")


def refused(name: str) -> UpstreamError:
    return UpstreamConnectError(name, "connection refused")


def timed_out(name: str) -> UpstreamError:
    return UpstreamTimeout(name, "first token", 30)


class FakeNode:
    """A scripted node: ``faults`` fail the first calls in turn, ``always`` fails every call.

    ``gate`` (an Event) holds every call until set; ``ttft_s`` moves the clock before a stream's
    first event; ``events`` is what a stream yields.
    """

    def __init__(
        self,
        name: str,
        *faults: Fault | None,
        always: Fault | None = None,
        gate: asyncio.Event | None = None,
        clock: ManualClock | None = None,
        ttft_s: float = 0.0,
        events: tuple[SseEvent, ...] = (CHUNK, DONE),
    ):
        self.name = name
        self.faults = list(faults)
        self.always = always
        self.gate = gate
        self.clock = clock
        self.ttft_s = ttft_s
        self.events = events
        self.calls = 0
        self.bodies: list[dict[str, object]] = []
        self.timeouts: list[Timeouts] = []
        self.streams_closed = 0
        self.probes = 0
        self.closed = False

    async def _call(self, body: bytes, timeouts: Timeouts) -> None:
        self.calls += 1
        self.bodies.append(orjson.loads(body))
        self.timeouts.append(timeouts)
        if self.gate is not None:
            await self.gate.wait()
        fault = self.faults.pop(0) if self.faults else self.always
        if fault is not None:
            raise fault(self.name)

    async def chat(self, body: bytes, timeouts: Timeouts) -> Reply:
        await self._call(body, timeouts)
        data = {"node": self.name}
        return Reply(200, orjson.dumps(data), "application/json", data)

    async def embed(self, body: bytes, timeouts: Timeouts) -> Reply:
        await self._call(body, timeouts)
        data = {"embedded_by": self.name}
        return Reply(200, orjson.dumps(data), "application/json", data)

    async def stream(self, body: bytes, timeouts: Timeouts) -> AsyncIterator[SseEvent]:
        try:
            await self._call(body, timeouts)
            if self.clock is not None:
                self.clock.advance(self.ttft_s)
            for event in self.events:
                yield event
        finally:
            self.streams_closed += 1

    async def probe(self, timeout_s: float) -> None:
        self.probes += 1

    async def aclose(self) -> None:
        self.closed = True


def private(node: FakeNode, max_concurrency: int = 4) -> NodeHandle:
    return _handle(node, "private", max_concurrency)


def cloud(node: FakeNode, max_concurrency: int = 4) -> NodeHandle:
    return _handle(node, "cloud", max_concurrency)


def _handle(node: FakeNode, kind: NodeKind, max_concurrency: int) -> NodeHandle:
    return NodeHandle(
        name=node.name,
        kind=kind,
        node=node,
        models={"m": f"{node.name}-model"},
        max_concurrency=max_concurrency,
        weight=1.0,
        timeouts=Timeouts(),
        counter=EstimatingCounter(),
    )


def build(
    clock: ManualClock,
    *handles: NodeHandle,
    retry: RetryPolicy = RETRY,
    budget: RetryBudget | None = None,
    queue_size: int = 8,
    breaker: BreakerPolicy = PATIENT,
) -> Dispatcher:
    """Wired like spillway.server.state: pools of private nodes, one queue per model."""
    pools: dict[str, list[str]] = {}
    for h in handles:
        if h.private:
            for model in h.models:
                pools.setdefault(model, []).append(h.name)
    router = Router(handles, BreakerBoard(breaker, clock, pools), clock, signal_stale_s=5.0)
    queues = {model: WaitQueue(queue_size, clock, model=model) for model in router.models()}
    for h in handles:
        for model in h.models:
            h.on_release.append(queues[model].notify)
    return Dispatcher(
        router, budget or RetryBudget(), queues, retry, clock, ttft_smoothing=0.2, rand=lambda: RAND
    )


def chat(stream: bool = False) -> ChatRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "stream": stream}
    return parse_chat(orjson.dumps(body))


def context(
    clock: ManualClock, private_only: bool = False, deadline_s: float = 60.0
) -> RequestContext:
    return RequestContext("req-1", "tenant", private_only, clock.monotonic() + deadline_s)


async def send(d: Dispatcher, ctx: RequestContext, mode: Mode) -> str:
    """One request through complete() or open_stream() (closed at once); the answering node."""
    if mode == "complete":
        answer = await d.complete(chat(), ctx)
        assert orjson.loads(answer.reply.body) == {"node": answer.handle.name}
        return answer.handle.name
    opened = await d.open_stream(chat(stream=True), ctx)
    assert opened.first == CHUNK
    await opened.aclose()
    return opened.handle.name


def handle_of(d: Dispatcher, name: str) -> NodeHandle:
    return next(h for h in d.router.handles if h.name == name)


def open_breaker(d: Dispatcher, name: str) -> None:
    for _ in range(100):
        d.board.record(name, False)
        if d.board.state(name) is BreakerState.OPEN:
            return
    raise AssertionError(f"{name}'s breaker did not open")


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


# --- fallback -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_500_on_first_private_node_falls_back_to_the_second(
    clock: ManualClock, mode: Mode
) -> None:
    a, b = FakeNode("a", http(500)), FakeNode("b")
    d = build(clock, private(a), private(b))
    assert await send(d, context(clock), mode) == "b"
    assert (a.calls, b.calls) == (1, 1)
    assert d.board.stats("a").consecutive_failures == 1
    assert handle_of(d, "a").stats.failures == 1
    assert handle_of(d, "b").stats.successes == 1
    assert handle_of(d, "a").in_flight == handle_of(d, "b").in_flight == 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", [http(503), http(429), http(404), refused, timed_out])
async def test_node_side_failures_fall_back(clock: ManualClock, mode: Mode, fault: Fault) -> None:
    a, b = FakeNode("a", fault), FakeNode("b")
    d = build(clock, private(a), private(b))
    assert await send(d, context(clock), mode) == "b"


@pytest.mark.parametrize("mode", MODES)
async def test_rejected_request_is_raised_and_no_other_node_is_called(
    clock: ManualClock, mode: Mode
) -> None:
    a, b, c = FakeNode("a", rejected), FakeNode("b"), FakeNode("c")
    d = build(clock, private(a), private(b), cloud(c))
    with pytest.raises(UpstreamRejected) as caught:
        await send(d, context(clock), mode)
    assert caught.value.status == 400 and caught.value.param == "messages"
    assert (a.calls, b.calls, c.calls) == (1, 0, 0)
    # the node's verdict on the request says nothing about the node
    assert d.board.stats("a").consecutive_failures == 0
    assert (handle_of(d, "a").stats.failures, handle_of(d, "a").stats.successes) == (0, 0)
    assert handle_of(d, "a").in_flight == 0


async def test_rejected_request_frees_a_half_open_probe_without_a_verdict(
    clock: ManualClock,
) -> None:
    a = FakeNode("a", rejected)
    d = build(clock, private(a), breaker=BreakerPolicy(consecutive_failures=1, half_open_probes=1))
    open_breaker(d, "a")
    clock.advance(30.0)
    assert d.board.state("a") is BreakerState.HALF_OPEN
    with pytest.raises(UpstreamRejected):
        await d.complete(chat(), context(clock))
    assert d.board.state("a") is BreakerState.HALF_OPEN
    assert d.board.stats("a").probes_in_flight == 0


async def test_failed_half_open_probe_reopens_the_breaker(clock: ManualClock) -> None:
    a = FakeNode("a", always=http(500))
    d = build(clock, private(a), breaker=BreakerPolicy(consecutive_failures=1, half_open_probes=1))
    open_breaker(d, "a")
    clock.advance(30.0)
    with pytest.raises(UpstreamsExhausted):
        await d.complete(chat(), context(clock))
    assert a.calls == 1
    assert d.board.state("a") is BreakerState.OPEN


async def test_spill_to_cloud_after_private_failure_is_counted(clock: ManualClock) -> None:
    p, c = FakeNode("p", always=http(500)), FakeNode("c")
    d = build(clock, private(p), cloud(c))
    assert await send(d, context(clock), "complete") == "c"
    assert (d.router.counters["m"].requests, d.router.counters["m"].spilled) == (1, 1)


async def test_node_gets_its_own_model_name(clock: ManualClock) -> None:
    a = FakeNode("a")
    d = build(clock, private(a))
    await send(d, context(clock), "complete")
    assert a.bodies[0]["model"] == "a-model"


async def test_embeddings_go_to_embed(clock: ManualClock) -> None:
    a, b = FakeNode("a", http(500)), FakeNode("b")
    d = build(clock, private(a), private(b))
    request = parse_embeddings(orjson.dumps({"model": "m", "input": "hello"}))
    answer = await d.complete(request, context(clock))
    assert orjson.loads(answer.reply.body) == {"embedded_by": "b"}
    assert (a.calls, b.calls) == (1, 1)


# --- attempts -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_at_most_max_attempts_across_nodes(clock: ManualClock, mode: Mode) -> None:
    nodes = [FakeNode(name, always=http(500)) for name in "abcd"]
    d = build(clock, *(private(n) for n in nodes))
    with pytest.raises(UpstreamsExhausted) as caught:
        await send(d, context(clock), mode)
    assert [n.calls for n in nodes] == [1, 1, 1, 0]
    error = caught.value
    assert [e.node for e in error.errors] == ["a", "b", "c"]
    assert error.status == 502
    for name in "abc":
        assert f"{name}: HTTP 500: boom" in error.message


async def test_timeouts_everywhere_exhaust_as_a_504(clock: ManualClock) -> None:
    a, b = FakeNode("a", always=timed_out), FakeNode("b", always=timed_out)
    d = build(clock, private(a), private(b), retry=RetryPolicy(max_attempts=2))
    with pytest.raises(UpstreamsExhausted) as caught:
        await d.complete(chat(), context(clock))
    assert (caught.value.status, caught.value.code) == (504, "upstream_timeout")


async def test_attempt_total_timeout_shrinks_to_the_remaining_deadline(
    clock: ManualClock,
) -> None:
    a = FakeNode("a")
    d = build(clock, private(a))
    await d.complete(chat(), context(clock, deadline_s=12.5))
    assert a.timeouts[0].total_s == 12.5
    await d.complete(chat(), context(clock, deadline_s=1000.0))
    assert a.timeouts[1] == Timeouts()


# --- backoff and Retry-After ----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_fresh_nodes_are_tried_without_delay(clock: ManualClock, mode: Mode) -> None:
    a, b, c = FakeNode("a", http(500)), FakeNode("b", refused), FakeNode("c")
    d = build(clock, private(a), private(b), private(c))
    before = clock.monotonic()
    assert await send(d, context(clock), mode) == "c"
    assert clock.monotonic() == before


@pytest.mark.parametrize("mode", MODES)
async def test_failed_node_is_retried_after_a_full_jitter_backoff(
    clock: ManualClock, mode: Mode
) -> None:
    a = FakeNode("a", http(500))
    d = build(clock, private(a))
    before = clock.monotonic()
    assert await send(d, context(clock), mode) == "a"
    assert a.calls == 2
    assert clock.monotonic() - before == pytest.approx(RETRY.delay_for(1, lambda: RAND))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "fault",
    [
        lambda name: UpstreamTimeout(name, "first token", 30),
        lambda name: UpstreamConnectError(name, "connection failed: reset", delivered=True),
    ],
    ids=["timed-out-after-sending", "broke-after-sending"],
)
async def test_a_node_that_may_still_be_generating_is_not_sent_the_request_again(
    clock: ManualClock, mode: Mode, fault: Fault
) -> None:
    """It got the request and gave no answer: sending it again could run it twice."""
    a = FakeNode("a", fault)
    d = build(clock, private(a))
    with pytest.raises((UpstreamsExhausted, UpstreamTimeout, UpstreamConnectError)):
        await send(d, context(clock), mode)
    assert a.calls == 1


async def test_backoff_grows_with_each_retry(clock: ManualClock) -> None:
    a = FakeNode("a", http(500), http(502))
    d = build(clock, private(a))
    before = clock.monotonic()
    assert await send(d, context(clock), "complete") == "a"
    assert a.calls == 3
    expected = RETRY.delay_for(1, lambda: RAND) + RETRY.delay_for(2, lambda: RAND)
    assert clock.monotonic() - before == pytest.approx(expected)  # 0.2 + 0.4


async def test_no_retry_when_the_backoff_outlasts_the_deadline(clock: ManualClock) -> None:
    a = FakeNode("a", http(500))
    d = build(clock, private(a), retry=RetryPolicy(max_attempts=3, base_s=4.0, cap_s=4.0))
    with pytest.raises(UpstreamsExhausted):
        await d.complete(chat(), context(clock, deadline_s=1.5))  # backoff 2.0 s
    assert a.calls == 1


@pytest.mark.parametrize("mode", MODES)
async def test_retry_after_is_honoured_when_it_fits_the_deadline(
    clock: ManualClock, mode: Mode
) -> None:
    a = FakeNode("a", http(429, retry_after="2"))
    d = build(clock, private(a))
    before = clock.monotonic()
    assert await send(d, context(clock, deadline_s=10.0), mode) == "a"
    assert a.calls == 2
    assert clock.monotonic() - before >= 2.0


@pytest.mark.parametrize("mode", MODES)
async def test_retry_after_longer_than_the_deadline_is_not_waited_for(
    clock: ManualClock, mode: Mode
) -> None:
    a = FakeNode("a", http(429, retry_after="2"))
    d = build(clock, private(a))
    before = clock.monotonic()
    with pytest.raises(UpstreamsExhausted) as caught:
        await send(d, context(clock, deadline_s=1.5), mode)
    assert a.calls == 1
    assert clock.monotonic() == before
    assert "HTTP 429" in caught.value.message


# --- retry budget ---------------------------------------------------------------------------


async def test_spent_retry_budget_leaves_one_attempt_per_request(clock: ManualClock) -> None:
    a, b = FakeNode("a", always=http(500)), FakeNode("b", always=http(500))
    budget = RetryBudget(ratio=0.2, min_retries=0, burst=1)
    d = build(clock, private(a), private(b), budget=budget, retry=RetryPolicy(max_attempts=2))

    async def attempts() -> int:
        before = a.calls + b.calls
        with pytest.raises(UpstreamsExhausted):
            await d.complete(chat(), context(clock))
        return a.calls + b.calls - before

    # spend the one retry the budget holds (whether it starts full or fills up first)
    spent = [await attempts()]
    while spent[-1] != 2:
        assert len(spent) < 5, spent
        spent.append(await attempts())
    assert budget.stats().balance < 1.0
    # each request deposits 0.2 of a retry: four more single attempts, then one retry again
    assert [await attempts() for _ in range(5)] == [1, 1, 1, 1, 2]
    stats = budget.stats()
    assert (stats.requests_in_flight, stats.retries_in_flight) == (0, 0)
    assert stats.retries_granted == 2


@pytest.mark.parametrize(
    "fault",
    [
        lambda name: UpstreamConnectError(name, "cannot connect", delivered=False),
        lambda name: UpstreamTimeout(name, "connection", 3),
    ],
    ids=["refused", "connect-timeout"],
)
async def test_a_failure_to_connect_fails_over_without_the_retry_budget(
    clock: ManualClock, fault: Fault
) -> None:
    a, b = FakeNode("a", always=fault), FakeNode("b")
    budget = RetryBudget(ratio=0.0, min_retries=0, burst=0)  # never grants a retry
    d = build(clock, private(a), private(b), budget=budget)
    assert (await d.complete(chat(), context(clock))).handle.name == "b"
    assert budget.stats().retries_granted == 0


# --- private_only ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_private_only_never_calls_the_cloud_node(clock: ManualClock, mode: Mode) -> None:
    p1, p2, c = FakeNode("p1", http(500)), FakeNode("p2"), FakeNode("c")
    d = build(clock, cloud(c), private(p1), private(p2))
    assert await send(d, context(clock, private_only=True), mode) == "p2"
    assert c.calls == 0


@pytest.mark.parametrize("mode", MODES)
async def test_private_only_with_every_private_node_failing_is_a_503(
    clock: ManualClock, mode: Mode
) -> None:
    p1, p2 = FakeNode("p1", always=http(500)), FakeNode("p2", always=refused)
    c = FakeNode("c")
    d = build(clock, private(p1), private(p2), cloud(c))
    with pytest.raises(NoEligibleNode) as caught:
        await send(d, context(clock, private_only=True), mode)
    error = caught.value
    assert (error.status, error.code) == (503, "no_eligible_node")
    assert "private_only" in error.message
    assert "p1: HTTP 500" in error.message and "p2: connection refused" in error.message
    assert c.calls == 0
    assert p1.calls + p2.calls == RETRY.max_attempts


async def test_private_only_without_a_private_node_fails_before_any_call(
    clock: ManualClock,
) -> None:
    c = FakeNode("c")
    d = build(clock, cloud(c))
    with pytest.raises(NoEligibleNode) as caught:
        await d.complete(chat(), context(clock, private_only=True))
    assert "private_only" in caught.value.message
    assert c.calls == 0


# --- capacity -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_request_waits_for_a_busy_node_and_is_served_after_the_first(
    clock: ManualClock, mode: Mode
) -> None:
    gate = asyncio.Event()
    p = FakeNode("p", gate=gate)
    d = build(clock, private(p, max_concurrency=1))
    done: list[str] = []

    async def run(tag: str) -> None:
        assert await send(d, context(clock), mode) == "p"
        done.append(tag)

    first = asyncio.create_task(run("first"))
    await settle()
    second = asyncio.create_task(run("second"))
    await settle()
    assert p.calls == 1
    assert d.queues["m"].waiting == 1
    gate.set()
    await asyncio.gather(first, second)
    assert done == ["first", "second"]
    assert p.calls == 2 and handle_of(d, "p").in_flight == 0


@pytest.mark.parametrize("mode", MODES)
async def test_request_spills_to_the_cloud_at_once_when_private_is_full(
    clock: ManualClock, mode: Mode
) -> None:
    gate = asyncio.Event()
    p, c = FakeNode("p", gate=gate), FakeNode("c")
    d = build(clock, private(p, max_concurrency=1), cloud(c))
    first = asyncio.create_task(send(d, context(clock), mode))
    await settle()
    assert await send(d, context(clock), mode) == "c"
    assert d.queues["m"].waiting == 0
    gate.set()
    assert await first == "p"
    assert (d.router.counters["m"].requests, d.router.counters["m"].spilled) == (2, 1)


@pytest.mark.parametrize("queue_size", [0, 1])
async def test_full_queue_refuses_with_429_and_retry_after(
    clock: ManualClock, queue_size: int
) -> None:
    gate = asyncio.Event()
    p = FakeNode("p", gate=gate)
    d = build(clock, private(p, max_concurrency=1), queue_size=queue_size)
    blocked = [asyncio.create_task(send(d, context(clock), "complete"))]
    await settle()
    blocked += [asyncio.create_task(send(d, context(clock), "complete")) for _ in range(queue_size)]
    await settle()
    with pytest.raises(QueueFull) as caught:
        await d.complete(chat(), context(clock))
    assert (caught.value.status, caught.value.code) == (429, "queue_full")
    assert caught.value.retry_after_s == 1
    assert p.calls == 1
    gate.set()
    assert await asyncio.gather(*blocked) == ["p"] * (1 + queue_size)


@pytest.mark.parametrize("private_only", [False, True])
async def test_waiting_until_the_deadline_is_a_503(clock: ManualClock, private_only: bool) -> None:
    gate = asyncio.Event()
    p = FakeNode("p", gate=gate)
    d = build(clock, private(p, max_concurrency=1))
    first = asyncio.create_task(send(d, context(clock), "complete"))
    await settle()
    # WaitQueue times out on loop time: a short real deadline
    with pytest.raises(NoEligibleNode) as caught:
        await d.complete(chat(), context(clock, private_only, deadline_s=0.05))
    assert caught.value.status == 503
    assert "stayed busy" in caught.value.message
    assert ("private_only" in caught.value.message) is private_only
    assert d.queues["m"].waiting == 0
    gate.set()
    assert await first == "p"
    assert p.calls == 1


# --- breakers and deadline ------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_every_breaker_open_fails_fast_without_calling_a_node(
    clock: ManualClock, mode: Mode
) -> None:
    p, c = FakeNode("p"), FakeNode("c")
    d = build(clock, private(p), cloud(c), breaker=BreakerPolicy())
    open_breaker(d, "p")
    open_breaker(d, "c")
    before = clock.monotonic()
    with pytest.raises(NoEligibleNode) as caught:
        await send(d, context(clock), mode)
    assert (p.calls, c.calls) == (0, 0)
    assert clock.monotonic() == before
    assert caught.value.status == 503
    assert caught.value.retry_after_s == 30  # BreakerPolicy().open_base_s
    assert "circuit open" in caught.value.message


async def test_retry_after_counts_down_with_the_open_breakers(clock: ManualClock) -> None:
    p = FakeNode("p")
    d = build(clock, private(p), breaker=BreakerPolicy())
    open_breaker(d, "p")
    clock.advance(20.5)
    with pytest.raises(NoEligibleNode) as caught:
        await d.complete(chat(), context(clock))
    assert caught.value.retry_after_s == 10


async def test_private_only_retry_after_ignores_cloud_nodes(clock: ManualClock) -> None:
    p, c = FakeNode("p"), FakeNode("c")
    d = build(clock, private(p), cloud(c), breaker=BreakerPolicy())
    open_breaker(d, "p")
    with pytest.raises(NoEligibleNode) as caught:
        await d.complete(chat(), context(clock, private_only=True))
    assert p.calls == c.calls == 0
    assert caught.value.retry_after_s == 30


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("late_s", [0.0, 1.0])
async def test_passed_deadline_raises_without_calling_a_node(
    clock: ManualClock, mode: Mode, late_s: float
) -> None:
    p = FakeNode("p")
    d = build(clock, private(p))
    with pytest.raises(DeadlineExceeded) as caught:
        await send(d, context(clock, deadline_s=-late_s), mode)
    assert (caught.value.status, caught.value.code) == (504, "deadline_exceeded")
    assert p.calls == 0
    assert d.budget.stats().requests_in_flight == 0


# --- streams --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "events",
    [
        (DONE,),
        (),
        (SseEvent(b'{"message":"overloaded"}', event="error"), DONE),
        (SseEvent(b'{"error":{"message":"overloaded"}}'), DONE),
    ],
    ids=["done-first", "empty", "error-event", "error-payload"],
)
async def test_stream_without_a_good_first_event_falls_back(
    clock: ManualClock, events: tuple[SseEvent, ...]
) -> None:
    a, b = FakeNode("a", events=events), FakeNode("b")
    d = build(clock, private(a), private(b))
    opened = await d.open_stream(chat(stream=True), context(clock))
    assert (opened.handle.name, opened.first) == ("b", CHUNK)
    assert d.board.stats("a").consecutive_failures == 1
    assert handle_of(d, "a").in_flight == 0
    assert a.streams_closed == 1
    await opened.aclose()


async def test_chunk_with_a_null_error_field_commits(clock: ManualClock) -> None:
    first = SseEvent(b'{"choices":[],"error":null}')
    a = FakeNode("a", events=(first, DONE))
    d = build(clock, private(a))
    opened = await d.open_stream(chat(stream=True), context(clock))
    assert (opened.handle.name, opened.first) == ("a", first)
    await opened.aclose()


async def test_stream_asks_the_node_for_usage(clock: ManualClock) -> None:
    a = FakeNode("a")
    d = build(clock, private(a))
    opened = await d.open_stream(chat(stream=True), context(clock))
    await opened.aclose()
    assert a.bodies[0]["stream_options"] == {"include_usage": True}


async def test_stream_commit_updates_the_ttft_ewma(clock: ManualClock) -> None:
    a = FakeNode("a", clock=clock, ttft_s=0.3)
    d = build(clock, private(a))
    h = handle_of(d, "a")
    opened = await d.open_stream(chat(stream=True), context(clock))
    await opened.aclose()
    assert h.stats.ttft_ewma_s == pytest.approx(0.3)
    a.ttft_s = 0.8
    opened = await d.open_stream(chat(stream=True), context(clock))
    await opened.aclose()
    assert h.stats.ttft_ewma_s == pytest.approx(0.3 + 0.2 * (0.8 - 0.3))


async def test_failed_stream_does_not_update_the_ttft(clock: ManualClock) -> None:
    a, b = FakeNode("a", http(500), clock=clock, ttft_s=0.3), FakeNode("b")
    d = build(clock, private(a), private(b))
    opened = await d.open_stream(chat(stream=True), context(clock))
    await opened.aclose()
    assert handle_of(d, "a").stats.ttft_ewma_s is None


async def test_broken_stream_records_a_breaker_failure(clock: ManualClock) -> None:
    a = FakeNode("a")
    d = build(clock, private(a))
    opened = await d.open_stream(chat(stream=True), context(clock))
    assert d.board.stats("a").consecutive_failures == 0  # the commit was a success
    opened.broke()
    await opened.aclose()
    assert d.board.stats("a").consecutive_failures == 1
    assert (handle_of(d, "a").stats.successes, handle_of(d, "a").stats.failures) == (1, 1)


async def test_stream_holds_its_slot_until_aclose(clock: ManualClock) -> None:
    a = FakeNode("a", events=(CHUNK, CHUNK, DONE))
    d = build(clock, private(a))
    h = handle_of(d, "a")
    opened: OpenStream = await d.open_stream(chat(stream=True), context(clock))
    assert h.in_flight == 1
    assert [event async for event in opened.rest] == [CHUNK, DONE]
    assert h.in_flight == 1
    await opened.aclose()
    assert h.in_flight == 0
    await opened.aclose()  # idempotent
    assert h.in_flight == 0


async def test_stream_closed_early_cancels_the_node_and_frees_the_slot(
    clock: ManualClock,
) -> None:
    a = FakeNode("a", events=(CHUNK, CHUNK, CHUNK, DONE))
    d = build(clock, private(a))
    opened = await d.open_stream(chat(stream=True), context(clock))
    await opened.aclose()
    assert a.streams_closed == 1
    assert handle_of(d, "a").in_flight == 0


# --- with shared state ----------------------------------------------------------------------


class FakeFleet:
    """``FleetSlots`` as the dispatcher uses it: every claim granted (after ``hold``, when
    set); recording a failure meets Redis down (``StateDown``)."""

    def __init__(self, hold: asyncio.Event | None = None) -> None:
        self.hold = hold
        self.claims = 0

    async def claim(
        self, node: str, limit: int, in_flight: int, member: str, key: object = None
    ) -> Claim:
        self.claims += 1
        if self.hold is not None:
            await self.hold.wait()
        return Claim(True, member=member)

    def release(self, claim: Claim) -> None:
        pass

    def record(self, node: str, claim: Claim, ok: bool) -> Awaitable[object] | None:
        async def redis_down() -> object:
            raise StateDown("shared state is down")

        return None if ok else redis_down()

    def no_verdict(self, claim: Claim) -> None:
        pass

    def spawn(self, call: Awaitable[object]) -> None:
        asyncio.ensure_future(call).add_done_callback(lambda f: f.exception())


@pytest.mark.parametrize("mode", MODES)
async def test_a_failure_that_redis_cannot_record_still_falls_back(
    clock: ManualClock, mode: Mode
) -> None:
    a, b = FakeNode("a", http(500)), FakeNode("b")
    d = build(clock, private(a), private(b))
    d.slots = FakeFleet()  # type: ignore[assignment]
    assert await send(d, context(clock), mode) == "b"  # not a StateDown, not a 500
    assert d.board.stats("a").consecutive_failures == 1  # the local breaker counted it


async def test_a_request_cancelled_during_its_claim_gives_back_the_half_open_probe(
    clock: ManualClock,
) -> None:
    a = FakeNode("a")
    d = build(clock, private(a), breaker=BreakerPolicy(half_open_probes=1))
    open_breaker(d, "a")
    clock.advance(BreakerPolicy().open_base_s)  # half-open: one probe may go
    d.slots = FakeFleet(hold=asyncio.Event())  # type: ignore[assignment]
    task = asyncio.create_task(send(d, context(clock), "complete"))
    await settle()
    assert d.board.stats("a").probes_in_flight == 1  # admitted locally, claiming
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert d.board.stats("a").probes_in_flight == 0
