"""The semantic-cache hit decision: guards, features, the shipped weights, the matcher.

Synthetic vectors only; no embedding model is loaded."""

from __future__ import annotations

import numpy as np
import pytest

from spillway.cache.vectors import Neighbour
from spillway.cache.verifier import (
    DEFAULT_THRESHOLD,
    GUARDS,
    LEXICAL_FEATURES,
    WEIGHTS_PATH,
    Idf,
    SemanticMatcher,
    Verifier,
    analyse,
    pair_features,
    vetoed,
    word_order,
)

DIM = 384
ALL = ("numbers", "negation", "entities")
IDF = Idf(np.ones(1 << 4, dtype=np.float32), 1.0)


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def near(v: np.ndarray, cosine: float, seed: int) -> np.ndarray:
    """A unit vector at exactly ``cosine`` from unit vector ``v``."""
    r = unit(seed)
    r -= (r @ v) * v
    r /= np.linalg.norm(r)
    return (cosine * v + np.sqrt(1 - cosine**2) * r).astype(np.float32)


def veto(a: str, b: str) -> str | None:
    return vetoed(analyse(a), analyse(b), ALL)


@pytest.mark.parametrize(
    ("a", "b", "guard"),
    [
        ("What are the top 10 books of 2016?", "What are the top 10 books of 2017?", "numbers"),
        ("Best 5 laptops under $500?", "Best laptops under $500?", "numbers"),
        ("Can the digits 1,2,3 form a prime?", "Can the digits 123 form a prime?", "numbers"),
        ("Why can't I sleep at night?", "Why can I sleep at night?", "negation"),
        ("Is it safe to eat eggs without cooking?", "Is it safe to eat cooked eggs?", "negation"),
        ("How do I learn Python quickly?", "How do I learn Java quickly?", "entities"),
        ("Is Obama a good president?", "Is Trump a good president?", "entities"),
    ],
)
def test_guards_veto(a: str, b: str, guard: str) -> None:
    assert veto(a, b) == guard
    assert veto(b, a) == guard  # symmetric


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("What are the top 10 books?", "Which are the 10 best books?"),
        ("How much is 1,000 dollars in euros?", "How much is 1000 dollars in euros?"),
        ("Is $127,000, a year a good salary?", "Is $127000 a year a good salary?"),
        ("Why were the 500,1000 rupee notes banned?", "Why were the 500, 1000 rupee notes banned?"),
        ("Why don't cats like water?", "Why do cats not like water?"),
        ("What is the capital of india?", "What is the capital of India?"),
        ("Which is the best phone? Why?", "What is the best phone?"),  # sentence openers
        ("How do I learn to cook?", "What is the best way to learn cooking?"),
    ],
)
def test_guards_pass(a: str, b: str) -> None:
    assert veto(a, b) is None


def test_only_listed_guards_apply() -> None:
    a, b = analyse("top 10 of 2016"), analyse("top 10 of 2017")
    assert vetoed(a, b, ()) is None
    assert vetoed(a, b, ("negation",)) is None
    assert vetoed(a, b, ("negation", "numbers")) == "numbers"


def test_word_order() -> None:
    messi, ronaldo = (
        analyse("Is Messi better than Ronaldo?"),
        analyse("Is Ronaldo better than Messi?"),
    )
    assert word_order(messi, messi) == 1.0
    assert word_order(messi, ronaldo) == pytest.approx(1 / 3)
    assert word_order(analyse("why?"), analyse("how?")) == 1.0  # nothing shared, nothing swapped
    assert vetoed(messi, ronaldo, ("order",)) == "order"
    assert vetoed(messi, ronaldo, ALL) is None


def test_idf_is_hashed_and_bounded() -> None:
    weights = np.arange(8, dtype=np.float32)
    idf = Idf(weights, unseen=7.0)
    assert idf("python") == weights[Idf.bucket("python", 8)]
    assert idf.total(frozenset({"a", "b"})) == idf("a") + idf("b")


def test_features_shape_and_symmetry() -> None:
    u, v = unit(1), near(unit(1), 0.9, 2)
    a, b = analyse("How do I learn Python?"), analyse("What's the best way to learn Python?")
    ab = pair_features([a], u, [b], v, IDF)
    ba = pair_features([b], v, [a], u, IDF)
    assert ab.shape == (1, 2 * DIM + len(LEXICAL_FEATURES))
    assert np.allclose(ab, ba)
    assert ab[0, 2 * DIM] == pytest.approx(0.9, abs=1e-5)  # the cosine


def test_features_renormalise_vectors() -> None:
    u, v = unit(1), near(unit(1), 0.8, 2)
    lex = [analyse("x")]
    scaled = pair_features(lex, 3 * u, lex, 0.5 * v, IDF)
    assert np.allclose(scaled, pair_features(lex, u, lex, v, IDF))


@pytest.fixture(scope="module")
def shipped() -> Verifier:
    return Verifier.load()


def test_weights_file_is_small_and_described(shipped: Verifier) -> None:
    assert WEIGHTS_PATH.stat().st_size < 2 * 1024 * 1024
    meta = shipped.meta
    for key in ("version", "features", "guards", "threshold", "train_pairs", "tune_cv"):
        assert key in meta
    assert meta["features"][2:] == list(LEXICAL_FEATURES)
    assert meta["embedder"] == "local-minilm"
    assert meta["members"] >= 1
    assert set(shipped.guards) <= set(GUARDS)
    assert shipped.threshold == pytest.approx(DEFAULT_THRESHOLD)
    assert meta["tune_cv"]["precision"] >= 0.95


def test_scores_are_probabilities(shipped: Verifier) -> None:
    n = 32
    q = np.stack([unit(i) for i in range(n)])
    c = np.stack([near(q[i], 0.5 + 0.5 * i / n, 100 + i) for i in range(n)])
    texts = [f"how do i fix problem {i}" for i in range(n)]
    scores = shipped.scores(texts, q, texts[::-1], c)
    assert scores.shape == (n,)
    assert scores.dtype == np.float32
    assert ((scores >= 0) & (scores <= 1)).all()
    assert shipped.score(texts[0], q[0], texts[-1], c[0]) == pytest.approx(float(scores[0]))


def test_identical_prompt_is_a_hit_and_far_one_is_not(shipped: Verifier) -> None:
    text, u = "How do I improve my English speaking skills?", unit(7)
    assert shipped.score(text, u, text, u) >= DEFAULT_THRESHOLD
    assert shipped.score(text, u, "What is the best pizza in Rome?", unit(8)) < 0.1


def toy_verifier(guards: tuple[str, ...] = ALL, floor: float = 0.0) -> Verifier:
    """A verifier that scores by cosine alone: sigmoid(40 * (cos - 0.9)), as two members
    (one with a hidden ReLU layer) that agree."""
    n = 2 * DIM + len(LEXICAL_FEATURES)
    w = np.zeros((n, 1), dtype=np.float32)
    w[2 * DIM, 0] = 40.0
    b = np.array([-36.0], dtype=np.float32)
    relu = [(w, np.zeros(1, np.float32)), (np.ones((1, 1), np.float32), b)]  # cos >= 0 here
    meta = {"guards": list(guards), "threshold": 0.5, "floor": floor}
    mean, scale = np.zeros(n, np.float32), np.ones(n, np.float32)
    return Verifier(mean, scale, [[(w, b)], relu], IDF, meta)


def neighbours(q: np.ndarray, items: list[tuple[str, str, float]]) -> list[Neighbour]:
    out = []
    for i, (key, text, cosine) in enumerate(items):
        vec = near(q, cosine, 50 + i)
        out.append(Neighbour(key=key, text=text, vector=vec, similarity=float(vec @ q)))
    return out


async def test_matcher_picks_the_best_scoring() -> None:
    q = unit(3)
    found = neighbours(q, [("a", "how to boil eggs", 0.93), ("b", "boiling eggs how", 0.97),
                           ("c", "how do i boil eggs", 0.95)])  # fmt: skip
    hit = await SemanticMatcher(toy_verifier()).best("how do you boil eggs", q, found, 0.5)
    assert hit is not None and hit.key == "b"


async def test_matcher_returns_none_below_threshold_or_empty() -> None:
    q = unit(3)
    matcher = SemanticMatcher(toy_verifier())
    assert await matcher.best("q", q, [], 0.5) is None
    assert (
        await matcher.best("how do you boil eggs", q, neighbours(q, [("a", "eggs", 0.85)]), 0.5)
        is None
    )
    found = neighbours(q, [("a", "how to boil eggs", 0.93)])
    assert await matcher.best("how do i boil eggs", q, found, 0.5) is not None
    assert await matcher.best("how do i boil eggs", q, found, 0.99) is None


async def test_matcher_skips_a_vetoed_best_for_the_next() -> None:
    q = unit(4)
    found = neighbours(q, [("2017", "top 10 films of 2017", 0.99),
                           ("2016", "best 10 films of 2016", 0.95)])  # fmt: skip
    hit = await SemanticMatcher(toy_verifier()).best("top 10 films of 2016", q, found, 0.5)
    assert hit is not None and hit.key == "2016"
    unguarded = await SemanticMatcher(toy_verifier(guards=())).best(
        "top 10 films of 2016", q, found, 0.5
    )
    assert unguarded is not None and unguarded.key == "2017"


async def test_matcher_floor_skips_far_neighbours() -> None:
    q = unit(5)
    found = neighbours(q, [("a", "how to boil eggs", 0.93)])
    assert (
        await SemanticMatcher(toy_verifier(floor=0.95)).best("how to boil eggs", q, found, 0.5)
        is None
    )
    assert (
        await SemanticMatcher(toy_verifier(), floor=0.95).best("how to boil eggs", q, found, 0.5)
        is None
    )


async def test_shipped_matcher_end_to_end(shipped: Verifier) -> None:
    q = unit(6)
    matcher = SemanticMatcher(shipped)
    same = neighbours(q, [("k", "How do I improve my English?", 1.0)])
    assert (
        await matcher.best("How do I improve my English?", q, same, DEFAULT_THRESHOLD) is not None
    )
    other_year = neighbours(q, [("k", "Best movies of 2015?", 0.99)])
    assert await matcher.best("Best movies of 2016?", q, other_year, 0.0) is None or (
        "numbers" not in shipped.guards
    )


def test_the_same_prompt_scores_one(shipped: Verifier) -> None:
    u, v = unit(9), unit(10)  # the rule does not look at the vectors
    assert shipped.score("how do i  reset my password", u, "How do I reset my password ?", v) == 1.0
    assert shipped.score("What is C++?", u, "What is C#?", v) < 1.0
    assert analyse("Why is the sky blue?!").normal == analyse("why is the sky blue").normal
