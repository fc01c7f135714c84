"""In-flight merging: one leader per key, followers get its answer or are released."""

from __future__ import annotations

import asyncio

from spillway.cache.merging import InflightMerger, wait_for_leader


async def test_followers_get_the_leaders_answer() -> None:
    merger = InflightMerger()
    assert merger.follow("k") is None  # the first one leads
    followers = [merger.follow("k") for _ in range(3)]
    assert all(f is not None for f in followers)
    waits = [asyncio.create_task(wait_for_leader(f, 1.0)) for f in followers if f]
    merger.finish("k", b"answer")
    assert await asyncio.gather(*waits) == [b"answer"] * 3
    assert merger.statistics().in_flight == 0
    assert merger.follow("k") is None  # a new round has a new leader


async def test_a_failed_leader_releases_followers_with_nothing() -> None:
    merger = InflightMerger()
    merger.follow("k")
    future = merger.follow("k")
    assert future is not None
    merger.finish("k", None)
    assert await wait_for_leader(future, 1.0) is None


async def test_a_follower_that_gives_up_does_not_cancel_the_leader() -> None:
    merger = InflightMerger()
    merger.follow("k")
    future = merger.follow("k")
    assert future is not None
    assert await wait_for_leader(future, 0.01) is None
    assert not future.cancelled()
    merger.finish("k", b"late")
    assert future.result() == b"late"


async def test_keys_are_independent() -> None:
    merger = InflightMerger()
    assert merger.follow("a") is None
    assert merger.follow("b") is None
