"""Per-node circuit breakers and the board's ejection cap, driven by a ManualClock."""

from __future__ import annotations

from typing import Any

import pytest

from spillway.clock import ManualClock
from spillway.resilience.breaker import (
    Breaker,
    BreakerBoard,
    BreakerPolicy,
    BreakerState,
)

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def make(clock: ManualClock, **policy: Any) -> Breaker:
    return Breaker(BreakerPolicy(**policy), clock)


def fail(breaker: Breaker, times: int) -> None:
    for _ in range(times):
        breaker.record_failure()


def succeed(breaker: Breaker, times: int) -> None:
    for _ in range(times):
        breaker.record_success()


def trip(breaker: Breaker, clock: ManualClock) -> None:
    """Open a fresh breaker, then let its open time pass so it reads HALF_OPEN."""
    fail(breaker, 5)
    assert breaker.state is OPEN
    clock.advance(breaker.stats().open_remaining_s)
    assert breaker.state is HALF_OPEN


# --- policy -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("openings", "seconds"),
    [(1, 30.0), (2, 60.0), (3, 90.0), (9, 270.0), (10, 300.0), (11, 300.0), (100, 300.0)],
)
def test_open_duration_grows_linearly_and_is_capped(openings: int, seconds: float) -> None:
    assert BreakerPolicy().open_duration(openings) == seconds


@pytest.mark.parametrize(
    "bad",
    [
        {"half_open_probes": 0},
        {"half_open_probes": 4},
        {"consecutive_failures": 0},
        {"failure_rate": 0.0},
        {"failure_rate": 1.5},
        {"min_calls": 21},
        {"min_calls": 0},
        {"open_max_s": 10.0},
        {"max_ejected_share": 1.5},
    ],
)
def test_policy_rejects_nonsense(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="BreakerPolicy"):
        BreakerPolicy(**bad)


@pytest.mark.parametrize("probes", [1, 2, 3])
def test_policy_accepts_one_to_three_probes(probes: int) -> None:
    assert BreakerPolicy(half_open_probes=probes).half_open_probes == probes


# --- CLOSED -> OPEN ---------------------------------------------------------------------------


def test_a_new_breaker_is_closed_and_allows(clock: ManualClock) -> None:
    breaker = make(clock)
    stats = breaker.stats()
    assert breaker.state is CLOSED and breaker.allow()
    assert (stats.consecutive_failures, stats.failure_share, stats.openings) == (0, 0.0, 0)
    assert (stats.open_remaining_s, stats.probes_in_flight) == (0.0, 0)


def test_consecutive_failures_open_the_breaker(clock: ManualClock) -> None:
    breaker = make(clock)
    fail(breaker, 4)
    assert breaker.state is CLOSED and breaker.stats().consecutive_failures == 4
    breaker.record_failure()
    stats = breaker.stats()
    assert stats.state is OPEN and not breaker.allow()
    assert stats.openings == 1 and stats.open_remaining_s == 30.0


def test_a_success_resets_the_consecutive_count(clock: ManualClock) -> None:
    breaker = make(clock)
    fail(breaker, 4)
    breaker.record_success()
    fail(breaker, 4)  # 8 failures of 9 calls, but the window is below min_calls
    assert breaker.state is CLOSED and breaker.stats().consecutive_failures == 4


def test_failure_rate_opens_once_the_window_holds_min_calls(clock: ManualClock) -> None:
    breaker = make(clock)
    for _ in range(4):  # S F S F ...: never two failures in a row
        breaker.record_success()
        breaker.record_failure()
    breaker.record_success()
    assert breaker.state is CLOSED  # 9 calls: the rate is not judged yet
    breaker.record_failure()  # 10 calls, 5 failures: 50 % >= 50 %
    assert breaker.state is OPEN and breaker.stats().consecutive_failures == 1


def test_min_calls_holds_back_the_rate_rule(clock: ManualClock) -> None:
    breaker = make(clock, consecutive_failures=100)
    fail(breaker, 9)
    assert breaker.state is CLOSED and breaker.stats().failure_share == 1.0
    breaker.record_failure()
    assert breaker.state is OPEN


def test_failure_rate_below_the_threshold_keeps_it_closed(clock: ManualClock) -> None:
    breaker = make(clock, consecutive_failures=100)
    succeed(breaker, 11)
    fail(breaker, 9)  # 9 of the last 20: 45 %
    assert breaker.state is CLOSED and breaker.stats().failure_share == pytest.approx(0.45)
    breaker.record_failure()  # the oldest success slides out: 10 of 20
    assert breaker.state is OPEN


def test_the_window_forgets_old_outcomes(clock: ManualClock) -> None:
    breaker = make(clock, consecutive_failures=100, window=10, min_calls=10)
    fail(breaker, 4)
    succeed(breaker, 10)
    assert breaker.stats().failure_share == 0.0
    fail(breaker, 4)
    assert breaker.state is CLOSED and breaker.stats().failure_share == pytest.approx(0.4)


def test_successes_alone_never_open(clock: ManualClock) -> None:
    breaker = make(clock)
    succeed(breaker, 100)
    assert breaker.state is CLOSED


# --- OPEN -> HALF_OPEN -> CLOSED / OPEN -------------------------------------------------------


def test_open_turns_half_open_when_its_time_has_passed(clock: ManualClock) -> None:
    breaker = make(clock)
    fail(breaker, 5)
    clock.advance(29.9)
    assert breaker.state is OPEN and not breaker.allow()
    assert breaker.stats().open_remaining_s == pytest.approx(0.1)
    clock.advance(0.1)
    assert breaker.state is HALF_OPEN


def test_each_reopening_stays_open_longer_up_to_the_cap(clock: ManualClock) -> None:
    breaker = make(clock)
    fail(breaker, 5)
    seen = []
    for _ in range(12):
        stats = breaker.stats()
        seen.append(stats.open_remaining_s)
        clock.advance(stats.open_remaining_s)
        assert breaker.allow()  # a probe
        breaker.record_failure()  # fails: reopen
    assert seen == [30.0, 60.0, 90.0, 120.0, 150.0, 180.0, 210.0, 240.0, 270.0, 300.0, 300.0, 300.0]
    assert breaker.stats().openings == 13


@pytest.mark.parametrize("probes", [1, 2, 3])
def test_half_open_admits_exactly_the_probes(clock: ManualClock, probes: int) -> None:
    breaker = make(clock, half_open_probes=probes)
    trip(breaker, clock)
    assert [breaker.allow() for _ in range(probes + 2)] == [True] * probes + [False, False]
    assert breaker.stats().probes_in_flight == probes


def test_half_open_closes_after_enough_successes(clock: ManualClock) -> None:
    breaker = make(clock)
    trip(breaker, clock)
    for _ in range(3):
        assert breaker.allow()
    succeed(breaker, 2)
    assert breaker.state is HALF_OPEN
    breaker.record_success()
    stats = breaker.stats()
    assert stats.state is CLOSED and breaker.allow()
    assert (stats.openings, stats.consecutive_failures, stats.failure_share) == (0, 0, 0.0)


def test_a_finished_probe_frees_its_slot(clock: ManualClock) -> None:
    breaker = make(clock)
    trip(breaker, clock)
    for _ in range(3):
        breaker.allow()
    assert not breaker.allow()
    breaker.record_success()
    assert breaker.allow() and not breaker.allow()


def test_any_half_open_failure_reopens_for_longer(clock: ManualClock) -> None:
    breaker = make(clock)
    trip(breaker, clock)
    breaker.allow()
    breaker.allow()
    breaker.record_success()
    breaker.record_failure()
    stats = breaker.stats()
    assert stats.state is OPEN and stats.openings == 2 and stats.open_remaining_s == 60.0
    assert stats.probes_in_flight == 0


def test_half_open_successes_must_be_consecutive(clock: ManualClock) -> None:
    breaker = make(clock)
    trip(breaker, clock)
    succeed(breaker, 2)
    breaker.record_failure()
    clock.advance(60.0)
    succeed(breaker, 2)  # a new round starts from zero
    assert breaker.state is HALF_OPEN
    breaker.record_success()
    assert breaker.state is CLOSED


def test_closing_resets_the_open_time(clock: ManualClock) -> None:
    breaker = make(clock)
    trip(breaker, clock)
    breaker.record_failure()  # second opening: 60 s
    clock.advance(60.0)
    succeed(breaker, 3)
    fail(breaker, 5)
    assert breaker.stats().open_remaining_s == 30.0 and breaker.stats().openings == 1


def test_release_frees_a_probe_and_records_nothing(clock: ManualClock) -> None:
    breaker = make(clock)
    trip(breaker, clock)
    for _ in range(3):
        breaker.allow()
    breaker.release()
    assert breaker.stats().probes_in_flight == 2 and breaker.allow()
    for _ in range(3):
        breaker.release()
    succeed(breaker, 2)
    assert breaker.state is HALF_OPEN  # released calls were no successes
    assert breaker.stats().probes_in_flight == 0  # never below zero


def test_release_when_closed_changes_nothing(clock: ManualClock) -> None:
    breaker = make(clock)
    fail(breaker, 4)
    breaker.release()
    assert breaker.stats().consecutive_failures == 4 and breaker.state is CLOSED


def test_late_outcomes_while_open_are_ignored(clock: ManualClock) -> None:
    breaker = make(clock)
    fail(breaker, 5)
    breaker.record_success()
    breaker.record_failure()
    stats = breaker.stats()
    assert stats.state is OPEN and stats.openings == 1 and stats.open_remaining_s == 30.0


def test_mark_recovered_half_opens_at_once(clock: ManualClock) -> None:
    breaker = make(clock)
    fail(breaker, 5)
    breaker.mark_recovered()
    assert breaker.state is HALF_OPEN and breaker.stats().open_remaining_s == 0.0
    assert breaker.allow()


def test_mark_recovered_leaves_closed_and_half_open_alone(clock: ManualClock) -> None:
    breaker = make(clock)
    breaker.mark_recovered()
    assert breaker.state is CLOSED
    trip(breaker, clock)
    breaker.allow()
    breaker.mark_recovered()  # must not hand out fresh probe slots
    assert breaker.stats().probes_in_flight == 1


def test_a_refused_opening_stays_closed_and_asks_again(clock: ManualClock) -> None:
    breaker = make(clock)
    asked = []

    def refuse() -> bool:
        asked.append(True)
        return False

    for _ in range(4):
        breaker.record_failure(refuse)
    assert asked == []  # not asked before the breaker wants to open
    breaker.record_failure(refuse)
    breaker.record_failure(refuse)
    assert len(asked) == 2 and breaker.state is CLOSED and breaker.allow()
    assert breaker.stats().consecutive_failures == 6
    breaker.record_failure(lambda: True)
    assert breaker.state is OPEN


def test_half_open_failure_does_not_ask_the_board(clock: ManualClock) -> None:
    breaker = make(clock)
    trip(breaker, clock)
    breaker.record_failure(lambda: False)
    assert breaker.state is OPEN


# --- the board --------------------------------------------------------------------------------


def board_with(clock: ManualClock, pools: dict[str, list[str]]) -> BreakerBoard:
    return BreakerBoard(BreakerPolicy(), clock, pools)


def board_fail(board: BreakerBoard, node: str, times: int = 5) -> None:
    for _ in range(times):
        board.record(node, ok=False)


@pytest.mark.parametrize(("size", "may_open"), [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 3)])
def test_the_board_caps_ejections_per_pool(clock: ManualClock, size: int, may_open: int) -> None:
    nodes = [f"n{i}" for i in range(size)]
    board = board_with(clock, {"m": nodes})
    for node in nodes:
        board_fail(board, node, 10)
    assert board.open_nodes() == nodes[:may_open]
    assert all(board.state(n) is CLOSED and board.allow(n) for n in nodes[may_open:])


def test_a_one_node_pool_can_always_be_ejected(clock: ManualClock) -> None:
    board = board_with(clock, {"m": ["solo"]})
    board_fail(board, "solo")
    assert board.state("solo") is OPEN and not board.allow("solo")


def test_nodes_outside_any_pool_open_freely(clock: ManualClock) -> None:
    board = board_with(clock, {"m": ["a", "b"]})
    board_fail(board, "a")
    board_fail(board, "cloud-1")
    board_fail(board, "cloud-2")
    assert board.open_nodes() == ["a", "cloud-1", "cloud-2"]


def test_a_half_open_node_still_counts_as_ejected(clock: ManualClock) -> None:
    board = board_with(clock, {"m": ["a", "b"]})
    board_fail(board, "a")
    clock.advance(30.0)
    assert board.state("a") is HALF_OPEN
    board_fail(board, "b")
    assert board.state("b") is CLOSED
    for _ in range(3):
        assert board.allow("a")
        board.record("a", ok=True)
    assert board.state("a") is CLOSED
    board.record("b", ok=False)  # b kept counting while refused: one more failure opens it
    assert board.state("b") is OPEN


def test_a_node_in_two_pools_must_fit_both(clock: ManualClock) -> None:
    board = board_with(clock, {"small": ["a", "b"], "big": ["b", "c", "d", "e"]})
    board_fail(board, "a")
    board_fail(board, "b")  # "big" would allow it, "small" already has its one node out
    assert board.state("b") is CLOSED
    board_fail(board, "c")
    board_fail(board, "d")  # "big": c and d out = floor(4 * 0.5)
    board_fail(board, "e")
    assert board.open_nodes() == ["a", "c", "d"]


def test_a_shared_node_out_uses_up_both_pools(clock: ManualClock) -> None:
    board = board_with(clock, {"small": ["a", "b"], "big": ["b", "c", "d"]})
    board_fail(board, "b")
    board_fail(board, "a")
    board_fail(board, "c")
    assert board.open_nodes() == ["b"]


def test_a_name_listed_twice_is_one_node(clock: ManualClock) -> None:
    board = board_with(clock, {"m": ["a", "a", "b", "c", "d"]})
    for node in "abcd":
        board_fail(board, node)
    assert board.open_nodes() == ["a", "b"]


def test_board_reopens_a_failing_probe_even_at_the_cap(clock: ManualClock) -> None:
    board = board_with(clock, {"m": ["a", "b"]})
    board_fail(board, "a")
    clock.advance(30.0)
    assert board.allow("a")
    board.record("a", ok=False)
    assert board.state("a") is OPEN and board.stats("a").openings == 2


def test_board_release_mark_recovered_and_stats(clock: ManualClock) -> None:
    board = board_with(clock, {"m": ["a"]})
    board_fail(board, "a")
    assert board.stats("a").state is OPEN and board.open_nodes() == ["a"]
    board.mark_recovered("a")
    assert board.state("a") is HALF_OPEN and board.open_nodes() == []
    assert [board.allow("a") for _ in range(4)] == [True, True, True, False]
    board.release("a")
    assert board.stats("a").probes_in_flight == 2 and board.allow("a")


def test_unknown_nodes_start_closed(clock: ManualClock) -> None:
    board = board_with(clock, {})
    assert board.state("new") is CLOSED and board.allow("new")
    assert board.stats("new").openings == 0
