"""The blended matcher's decision around its two models: candidates, guards, the same prompt,
the floor, the prescreen and the blend. A toy verifier (cosine only) and a stand-in
cross-encoder score pairs, so no model loads here; the shipped cross-encoder is tested in
test_cross_encoder.py."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import pytest

from spillway.cache.cross_matcher import CrossEncoderMatcher, blend
from tests.unit.test_verifier import neighbours, toy_verifier, unit

T = TypeVar("T")


class Inline:
    """The model thread, run inline, counting passes."""

    def __init__(self) -> None:
        self.calls = 0

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        self.calls += 1
        return fn(*args)


class Judge:
    """Scores a pair by a table (cached text -> probability); records what it was asked."""

    def __init__(self, table: dict[str, float], prescreen: float = 0.0) -> None:
        self.table = table
        self.meta = {"prescreen": prescreen, "threshold": 0.5}
        self.asked: list[str] = []

    def probabilities(self, firsts: Sequence[str], seconds: Sequence[str]) -> np.ndarray:
        self.asked += list(firsts)
        return np.array([self.table.get(f, 0.0) for f in firsts], dtype=np.float32)


async def matcher(
    judge: Judge, thread: Inline | None = None, floor: float = 0.0, **kw: Any
) -> CrossEncoderMatcher:
    m = CrossEncoderMatcher(thread or Inline(), toy_verifier(floor=floor), lambda: judge, **kw)
    await m.warm()
    return m


def test_blend_is_the_mean_of_log_odds() -> None:
    assert blend([0.9], [0.9])[0] == pytest.approx(0.9)
    assert blend([0.5], [0.5])[0] == pytest.approx(0.5)
    assert blend([0.9], [0.1])[0] == pytest.approx(0.5)
    assert blend([0.99], [0.5])[0] == pytest.approx(1 / (1 + np.sqrt(1 / 99)))
    assert blend([0.8], [0.95])[0] == pytest.approx(blend([0.95], [0.8])[0])


async def test_the_best_blended_candidate_wins() -> None:
    q = unit(3)
    found = neighbours(q, [("a", "how to boil eggs", 0.95), ("b", "boiling an egg", 0.93)])
    judge = Judge({"how to boil eggs": 0.2, "boiling an egg": 0.99})
    hit = await (await matcher(judge, candidates=2)).best("how do I boil eggs", q, found, 0.5)
    assert hit is not None and hit.key == "b"
    assert judge.asked == ["how to boil eggs", "boiling an egg"]  # by verifier score


async def test_either_model_can_hold_a_hit_back() -> None:
    q = unit(4)
    found = neighbours(q, [("a", "how to boil eggs", 0.95)])  # verifier about 0.88
    sure, doubtful = await matcher(Judge({"how to boil eggs": 0.99})), await matcher(Judge({}))
    assert await sure.best("how do I boil eggs", q, found, 0.9) is not None
    assert await doubtful.best("how do I boil eggs", q, found, 0.5) is None
    far = neighbours(q, [("a", "how to boil eggs", 0.85)])  # verifier about 0.12
    assert await sure.best("how do I boil eggs", q, far, 0.9) is None
    assert await sure.best("how do I boil eggs", q, [], 0.0) is None


async def test_only_the_best_few_are_read() -> None:
    q = unit(5)
    found = neighbours(q, [("a", "eggs a", 0.97), ("b", "eggs b", 0.96), ("c", "eggs c", 0.95)])
    judge = Judge({"eggs c": 0.999})
    assert await (await matcher(judge, candidates=2)).best("eggs?", q, found, 0.5) is None
    assert judge.asked == ["eggs a", "eggs b"]


async def test_the_same_prompt_is_a_hit_without_a_pass() -> None:
    q, thread = unit(6), Inline()
    m = await matcher(Judge({}), thread)
    passes = thread.calls
    found = neighbours(q, [("k", "how do i  reset my password", 0.5)])
    hit = await m.best("How do I reset my password?", q, found, 0.99)
    assert hit is not None and thread.calls == passes


async def test_a_guard_vetoes_before_the_model_reads() -> None:
    q = unit(7)
    found = neighbours(q, [("2017", "top 10 films of 2017", 0.99),
                           ("2016", "best 10 films of 2016", 0.97)])  # fmt: skip
    judge = Judge({"top 10 films of 2017": 0.999, "best 10 films of 2016": 0.99})
    hit = await (await matcher(judge, candidates=2)).best("top 10 films of 2016", q, found, 0.5)
    assert hit is not None and hit.key == "2016"
    assert judge.asked == ["best 10 films of 2016"]


async def test_the_floor_and_the_prescreen_save_passes() -> None:
    q = unit(8)
    judge = Judge({"how to boil eggs": 0.999}, prescreen=0.5)
    m = await matcher(judge, floor=0.9)
    assert (m.floor, m.prescreen) == (0.9, 0.5)
    under_floor = neighbours(q, [("a", "how to boil eggs", 0.89)])
    under_prescreen = neighbours(q, [("a", "how to boil eggs", 0.9)])  # verifier 0.5 - a hair
    assert await m.best("how do I boil eggs", q, under_floor, 0.01) is None
    assert await m.best("how do I boil eggs", q, under_prescreen, 0.01) is None
    assert judge.asked == []


@pytest.mark.parametrize("candidates", [1, 3])
async def test_one_pass_per_lookup(candidates: int) -> None:
    q, thread = unit(9), Inline()
    m = await matcher(Judge({}), thread, candidates=candidates)
    before = thread.calls
    found = neighbours(q, [("a", "eggs a", 0.97), ("b", "eggs b", 0.96), ("c", "eggs c", 0.95)])
    await m.best("eggs?", q, found, 0.5)
    assert thread.calls == before + 1


@pytest.mark.parametrize("on", [True, False])
def test_the_config_switch_picks_the_decision_and_its_default(on: bool) -> None:
    from spillway.cache import cross_matcher, verifier
    from spillway.config.schema import CacheConfig
    from spillway.server.cache_setup import _local_matcher

    matcher, threshold = _local_matcher(CacheConfig(cross_encoder=on), Inline())  # type: ignore[arg-type]
    if on:
        assert isinstance(matcher, CrossEncoderMatcher)
        assert threshold == cross_matcher.DEFAULT_THRESHOLD
    else:
        assert isinstance(matcher, verifier.SemanticMatcher)
        assert threshold == verifier.DEFAULT_THRESHOLD


async def test_the_loaded_models_are_frozen_out_of_the_collectors_walks() -> None:
    """Objects loaded with the models live as long as the process: full collections skip
    them (with torch they took 250 ms a collection, the loop stopped)."""
    import gc

    from spillway.server.cache_setup import _warm

    class Embedder:
        async def warm(self) -> None:
            self.kept = [object() for _ in range(1000)]  # stands in for a model's objects

    embedder, judge = Embedder(), Judge({})
    m = CrossEncoderMatcher(Inline(), toy_verifier(), lambda: judge)
    gc.unfreeze()
    try:
        await _warm(embedder, m)  # type: ignore[arg-type]
        assert gc.get_freeze_count() >= 1000 and judge is m._judge
    finally:
        gc.unfreeze()
