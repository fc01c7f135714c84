"""The router: which node an attempt goes to, from load, engine signals, breakers and policy."""

from __future__ import annotations

from typing import Any

import pytest

from spillway.clock import ManualClock
from spillway.config.schema import NodeKind, Timeouts
from spillway.errors import ModelNotFound, NoEligibleNode
from spillway.nodes.signals import EngineLoad
from spillway.nodes.tokens import EstimatingCounter
from spillway.resilience.breaker import BreakerBoard, BreakerPolicy
from spillway.routing.router import KV_FULL_PENALTY, NodeHandle, Pick, Router

STALE_S = 5.0


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def handle(
    name: str,
    kind: NodeKind = "private",
    *,
    in_flight: int = 0,
    max_concurrency: int = 4,
    weight: float = 1.0,
    models: tuple[str, ...] = ("m",),
    spill_wait_s: float = 2.0,
) -> NodeHandle:
    dummy: Any = object()  # the router never calls the node
    return NodeHandle(
        name=name,
        kind=kind,
        node=dummy,
        models={m: f"{m}-upstream" for m in models},
        max_concurrency=max_concurrency,
        weight=weight,
        timeouts=Timeouts(),
        counter=EstimatingCounter(),
        spill_wait_s=spill_wait_s,
        in_flight=in_flight,
    )


def make_router(clock: ManualClock, *handles: NodeHandle) -> Router:
    pools: dict[str, list[str]] = {}
    for h in handles:
        if h.private:
            for model in h.models:
                pools.setdefault(model, []).append(h.name)
    board = BreakerBoard(BreakerPolicy(), clock, pools)
    return Router(handles, board, clock, signal_stale_s=STALE_S)


def picked(router: Router, private_only: bool = False, exclude: tuple[str, ...] = ()) -> str | None:
    pick = router.pick("m", private_only, exclude=exclude)
    return None if pick.handle is None else pick.handle.name


def ranking(router: Router, private_only: bool = False) -> list[str]:
    """Every node pick() would hand out, best first (each excluded once picked)."""
    seen: list[str] = []
    while (name := picked(router, private_only, tuple(seen))) is not None:
        seen.append(name)
    return seen


def open_breaker(router: Router, name: str) -> None:
    for _ in range(BreakerPolicy().consecutive_failures):
        router.board.record(name, False)


def load(waiting: float, kv: float | None = None) -> EngineLoad:
    return EngineLoad(waiting=waiting, running=1.0, kv_usage=kv)


# --- models ---------------------------------------------------------------------------------


def test_unknown_model_raises_model_not_found(clock: ManualClock) -> None:
    router = make_router(clock, handle("a"))
    for call in (
        lambda: router.pick("gpt-9", private_only=False),
        lambda: router.pick("gpt-9", private_only=True),
        lambda: router.serving("gpt-9"),
        lambda: router.check_eligible("gpt-9", private_only=True),
    ):
        with pytest.raises(ModelNotFound) as info:
            call()
        assert info.value.status == 404
        assert info.value.code == "model_not_found"
        assert info.value.param == "model"
        assert "gpt-9" in info.value.message


def test_models_lists_every_served_model_once(clock: ManualClock) -> None:
    router = make_router(
        clock, handle("a", models=("m", "x")), handle("b", "cloud", models=("x", "y"))
    )
    assert router.models() == ["m", "x", "y"]


def test_only_nodes_serving_the_model_are_picked(clock: ManualClock) -> None:
    router = make_router(clock, handle("a", models=("x",)), handle("b"), handle("c", "cloud"))
    assert ranking(router) == ["b", "c"]


# --- ranking --------------------------------------------------------------------------------


def test_private_nodes_ranked_by_in_flight_per_capacity_and_weight(clock: ManualClock) -> None:
    router = make_router(
        clock,
        handle("busy", in_flight=3, max_concurrency=4),  # 0.75
        handle("big", in_flight=3, max_concurrency=4, weight=4.0),  # 0.1875
        handle("idle"),  # 0.0
        handle("wide", in_flight=2, max_concurrency=8),  # 0.25
    )
    assert ranking(router) == ["idle", "big", "wide", "busy"]


def test_fresh_engine_waiting_counts_as_load(clock: ManualClock) -> None:
    queued, quiet = handle("queued"), handle("quiet", in_flight=2)
    router = make_router(clock, queued, quiet)
    router.observe_engine(queued, load(waiting=3))  # (0 + 3) / 4 against (2 + 0) / 4
    assert ranking(router) == ["quiet", "queued"]
    assert router.score(queued, clock.monotonic()) == (0.75, 0.0)


def test_nearly_full_kv_cache_adds_a_penalty(clock: ManualClock) -> None:
    full, nearly, loaded = handle("full"), handle("nearly"), handle("loaded", in_flight=1)
    router = make_router(clock, full, nearly, loaded)
    router.observe_engine(full, load(waiting=0, kv=0.95))
    router.observe_engine(nearly, load(waiting=0, kv=0.94))
    assert router.score(full, clock.monotonic())[0] == KV_FULL_PENALTY
    assert router.score(nearly, clock.monotonic())[0] == 0.0
    assert ranking(router) == ["nearly", "loaded", "full"]  # 0.0, 0.25, 0.5


def test_ttft_ewma_breaks_ties(clock: ManualClock) -> None:
    slow, fast, unknown = handle("slow"), handle("fast"), handle("unknown", in_flight=1)
    router = make_router(clock, slow, fast, unknown)
    router.observe_ttft(slow, 0.9, smoothing=0.2)
    router.observe_ttft(fast, 0.3, smoothing=0.2)
    assert ranking(router) == ["fast", "slow", "unknown"]


def test_stale_engine_signal_is_ignored_in_the_score(clock: ManualClock) -> None:
    queued = handle("queued")
    router = make_router(clock, queued, handle("other", in_flight=1))
    router.observe_engine(queued, load(waiting=3, kv=0.99))
    clock.advance(STALE_S)  # exactly signal_stale_s old: still trusted
    assert router.score(queued, clock.monotonic()) == (0.75 + KV_FULL_PENALTY, 0.0)
    assert ranking(router) == ["other", "queued"]
    clock.advance(0.01)
    assert router.score(queued, clock.monotonic()) == (0.0, 0.0)
    assert ranking(router) == ["queued", "other"]


# --- capacity, heat, spill ------------------------------------------------------------------


def test_node_at_max_concurrency_is_skipped(clock: ManualClock) -> None:
    full = handle("full", in_flight=1, max_concurrency=1, weight=10.0)  # best score, no room
    free = handle("free", in_flight=1, max_concurrency=4)
    router = make_router(clock, full, free)
    assert ranking(router) == ["free"]
    assert ranking(router, private_only=True) == ["free"]


def make_hot(router: Router, h: NodeHandle) -> None:
    router.observe_engine(h, load(waiting=2))
    router.observe_ttft(h, h.spill_wait_s + 1.0, smoothing=1.0)
    assert h.stats.hot


def test_hot_node_is_skipped_for_normal_requests_but_used_for_private_only(
    clock: ManualClock,
) -> None:
    hot, warm = handle("hot"), handle("warm", in_flight=3)
    router = make_router(clock, hot, warm, handle("cloud", "cloud"))
    make_hot(router, hot)  # its score (0.5) still beats warm's (0.75)
    assert ranking(router) == ["warm", "cloud"]
    assert ranking(router, private_only=True) == ["hot", "warm"]


def test_only_a_hot_private_node_spills_to_cloud(clock: ManualClock) -> None:
    hot = handle("hot")
    router = make_router(clock, hot, handle("cloud", "cloud"))
    make_hot(router, hot)
    assert picked(router) == "cloud"
    assert picked(router, private_only=True) == "hot"


def test_hot_node_without_cloud_leaves_a_busy_pick(clock: ManualClock) -> None:
    hot = handle("hot")
    router = make_router(clock, hot)
    make_hot(router, hot)
    assert router.pick("m", private_only=False) == Pick(None, busy=True)


def test_cloud_only_when_every_private_node_is_full_in_config_order(clock: ManualClock) -> None:
    router = make_router(
        clock,
        handle("c2", "cloud", in_flight=3),
        handle("p1", in_flight=2, max_concurrency=2),
        handle("c1", "cloud"),
        handle("p2", in_flight=1, max_concurrency=1),
    )
    assert ranking(router) == ["c2", "c1"]  # configuration order, not load order


def test_private_node_with_room_beats_an_idle_cloud(clock: ManualClock) -> None:
    router = make_router(clock, handle("c", "cloud"), handle("p", in_flight=3))
    assert picked(router) == "p"


def test_full_cloud_is_skipped(clock: ManualClock) -> None:
    router = make_router(
        clock,
        handle("p", in_flight=1, max_concurrency=1),
        handle("c1", "cloud", in_flight=2, max_concurrency=2),
        handle("c2", "cloud"),
    )
    assert picked(router) == "c2"


def test_everything_full_gives_a_busy_pick(clock: ManualClock) -> None:
    router = make_router(
        clock,
        handle("p", in_flight=1, max_concurrency=1),
        handle("c", "cloud", in_flight=1, max_concurrency=1),
    )
    assert router.pick("m", private_only=False) == Pick(None, busy=True)


def test_every_breaker_open_gives_a_pick_that_is_not_busy(clock: ManualClock) -> None:
    router = make_router(clock, handle("p"), handle("c", "cloud"))
    open_breaker(router, "p")
    open_breaker(router, "c")
    assert router.pick("m", private_only=False) == Pick(None, busy=False)
    assert router.pick("m", private_only=True) == Pick(None, busy=False)


def test_open_private_breaker_spills_to_cloud(clock: ManualClock) -> None:
    router = make_router(clock, handle("p"), handle("c", "cloud"))
    open_breaker(router, "p")
    assert picked(router) == "c"


def test_private_only_never_returns_a_cloud_node(clock: ManualClock) -> None:
    router = make_router(
        clock, handle("c", "cloud"), handle("p1", in_flight=4), handle("p2", in_flight=1)
    )
    assert ranking(router, private_only=True) == ["p2"]
    router.handles[2].in_flight = 4
    assert router.pick("m", private_only=True) == Pick(None, busy=True)


def test_exclude_skips_named_nodes(clock: ManualClock) -> None:
    router = make_router(clock, handle("a"), handle("b", in_flight=1), handle("c", "cloud"))
    assert picked(router, exclude=("a",)) == "b"
    assert picked(router, exclude=("a", "b")) == "c"
    assert router.pick("m", False, exclude=("a", "b", "c")) == Pick(None, busy=False)


def test_check_eligible_refuses_private_only_without_a_private_node(clock: ManualClock) -> None:
    router = make_router(clock, handle("cloud", "cloud"), handle("p", models=("other",)))
    router.check_eligible("m", private_only=False)
    router.check_eligible("other", private_only=True)
    with pytest.raises(NoEligibleNode) as info:
        router.check_eligible("m", private_only=True)
    assert info.value.status == 503
    assert info.value.code == "no_eligible_node"
    assert info.value.retry_after_s == 1
    assert "private_only" in info.value.message


# --- observations ---------------------------------------------------------------------------


def test_observe_ttft_starts_with_the_sample_then_smooths(clock: ManualClock) -> None:
    h = handle("a")
    router = make_router(clock, h)
    router.observe_ttft(h, 1.0, smoothing=0.25)
    assert h.stats.ttft_ewma_s == 1.0
    router.observe_ttft(h, 2.0, smoothing=0.25)
    assert h.stats.ttft_ewma_s == pytest.approx(1.25)
    router.observe_ttft(h, 0.25, smoothing=0.25)
    assert h.stats.ttft_ewma_s == pytest.approx(1.0)


def test_observe_engine_records_the_reading_and_its_time(clock: ManualClock) -> None:
    h = handle("a")
    router = make_router(clock, h)
    reading = load(waiting=1, kv=0.5)
    router.observe_engine(h, reading)
    at = clock.monotonic()
    clock.advance(1.0)
    router.observe_engine(h, None)  # a failed scrape keeps the last good reading
    assert (h.stats.engine, h.stats.engine_at) == (reading, at)
    assert h.engine_load(clock.monotonic(), STALE_S) == reading


@pytest.mark.parametrize(
    ("waiting", "ttft", "fresh", "hot"),
    [
        (1, 2.5, True, True),
        (1, 2.0, True, False),  # at the threshold: not above it
        (0, 9.0, True, False),  # the engine queues nothing
        (1, 9.0, False, False),  # the reading is stale
    ],
)
def test_hot_needs_a_fresh_signal_waiting_and_slow_ttft(
    clock: ManualClock, waiting: int, ttft: float, fresh: bool, hot: bool
) -> None:
    h = handle("a", spill_wait_s=2.0)
    router = make_router(clock, h)
    router.observe_engine(h, load(waiting=waiting))
    if not fresh:
        clock.advance(STALE_S + 0.1)
    router.observe_ttft(h, ttft, smoothing=1.0)
    assert h.stats.hot is hot


def test_hot_without_any_engine_signal_never(clock: ManualClock) -> None:
    h = handle("a", spill_wait_s=2.0)
    router = make_router(clock, h)
    router.observe_ttft(h, 10.0, smoothing=1.0)
    assert not h.stats.hot


def test_hot_stays_hot_between_half_and_full_threshold(clock: ManualClock) -> None:
    h = handle("a", spill_wait_s=2.0)
    router = make_router(clock, h)
    make_hot(router, h)
    router.observe_ttft(h, 1.5, smoothing=1.0)
    assert h.stats.hot
    router.observe_ttft(h, 1.0, smoothing=1.0)  # exactly half: not below it
    assert h.stats.hot


def test_cool_node_stays_cool_between_half_and_full_threshold(clock: ManualClock) -> None:
    h = handle("a", spill_wait_s=2.0)
    router = make_router(clock, h)
    router.observe_engine(h, load(waiting=3))
    router.observe_ttft(h, 1.5, smoothing=1.0)
    assert not h.stats.hot


def test_hot_cools_below_half_the_threshold(clock: ManualClock) -> None:
    h = handle("a", spill_wait_s=2.0)
    router = make_router(clock, h)
    make_hot(router, h)
    router.observe_ttft(h, 0.9, smoothing=1.0)
    assert not h.stats.hot


def test_hot_cools_when_the_signal_goes_stale(clock: ManualClock) -> None:
    h = handle("a", spill_wait_s=2.0)
    router = make_router(clock, h)
    make_hot(router, h)
    clock.advance(STALE_S + 0.1)
    router.observe_engine(h, None)  # the scrape failed; the last reading is now too old
    assert not h.stats.hot


def test_hot_cools_when_waiting_drops_to_zero(clock: ManualClock) -> None:
    h = handle("a", spill_wait_s=2.0)
    router = make_router(clock, h)
    make_hot(router, h)
    router.observe_engine(h, load(waiting=0))
    assert not h.stats.hot


def test_a_node_that_cooled_is_picked_again(clock: ManualClock) -> None:
    h = handle("p")
    router = make_router(clock, h, handle("c", "cloud"))
    make_hot(router, h)
    assert picked(router) == "c"
    router.observe_engine(h, load(waiting=0))
    assert picked(router) == "p"


# --- slots and counters ---------------------------------------------------------------------


def test_acquire_counts_in_flight_and_attempts(clock: ManualClock) -> None:
    h = handle("a")
    first, second = h.acquire(), h.acquire()
    assert (h.in_flight, h.stats.attempts) == (2, 2)
    first.release()
    second.release()
    assert (h.in_flight, h.stats.attempts) == (0, 2)


def test_slot_release_is_idempotent_and_wakes_listeners_once(clock: ManualClock) -> None:
    h = handle("a")
    woken: list[str] = []
    h.on_release += [lambda: woken.append("x"), lambda: woken.append("y")]
    slot, other = h.acquire(), h.acquire()
    slot.release()
    slot.release()
    assert h.in_flight == 1
    assert woken == ["x", "y"]
    other.release()
    assert h.in_flight == 0
    assert woken == ["x", "y", "x", "y"]


def test_note_answer_counts_requests_and_spills_per_model(clock: ManualClock) -> None:
    p = handle("p", models=("m", "x"))
    c = handle("c", "cloud", models=("m", "x"))
    router = make_router(clock, p, c)
    router.note_answer("m", p)
    router.note_answer("m", c)
    router.note_answer("m", c)
    router.note_answer("x", p)
    assert (router.counters["m"].requests, router.counters["m"].spilled) == (3, 2)
    assert (router.counters["x"].requests, router.counters["x"].spilled) == (1, 0)
