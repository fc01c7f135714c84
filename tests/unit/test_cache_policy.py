"""The cache policy matrix: model mode, request header, Cache-Control, determinism, n, logprobs."""

from __future__ import annotations

from typing import Any

import pytest

from spillway.cache.policy import plan
from spillway.config.schema import CacheConfig, ModelPolicy
from spillway.errors import InvalidRequest

DETERMINISTIC = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def decide(
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    cache: CacheConfig | None = None,
    model: ModelPolicy | None = None,
) -> tuple[str | None, bool, bool]:
    p = plan(body or DETERMINISTIC, headers or {}, cache or CacheConfig(), model or ModelPolicy())
    return p.mode, p.read, p.write


@pytest.mark.parametrize(
    ("configured", "header", "expected"),
    [
        ("exact", None, "exact"),
        ("semantic", None, "semantic"),
        ("off", None, None),
        ("exact", "semantic", "semantic"),
        ("semantic", "exact", "exact"),
        ("exact", "off", None),
        ("off", "exact", None),  # the operator's off is final
        ("off", "semantic", None),
        ("exact", " SEMANTIC ", "semantic"),
    ],
)
def test_mode_from_model_then_header(
    configured: str, header: str | None, expected: str | None
) -> None:
    headers = {"x-spillway-cache": header} if header else {}
    model = ModelPolicy(cache=configured)  # type: ignore[arg-type]
    assert decide(headers=headers, model=model)[0] == expected


def test_model_mode_overrides_the_default() -> None:
    assert decide(cache=CacheConfig(mode="off"), model=ModelPolicy(cache="exact"))[0] == "exact"
    assert decide(cache=CacheConfig(mode="semantic"), model=ModelPolicy(cache="off"))[0] is None


def test_bad_header_is_a_clear_400() -> None:
    with pytest.raises(InvalidRequest) as caught:
        decide(headers={"x-spillway-cache": "always"})
    assert "off, exact or semantic" in caught.value.message


@pytest.mark.parametrize(
    ("cache_control", "expected"),
    [
        ("no-store", (None, False, False)),
        ("no-cache", ("exact", False, True)),
        ("No-Cache, max-age=0", ("exact", False, True)),
        ("max-age=60", ("exact", True, True)),
    ],
)
def test_cache_control(cache_control: str, expected: tuple[str | None, bool, bool]) -> None:
    assert decide(headers={"cache-control": cache_control}) == expected


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 0.7},
        {"temperature": None},
        {"n": 2},
        {"logprobs": True},
        {"top_logprobs": 3},
    ],
)
def test_never_cached(change: dict[str, Any]) -> None:
    body = {**DETERMINISTIC, **change}
    if change.get("temperature", 0) is None:
        del body["temperature"]  # OpenAI's default temperature is 1
    assert decide(body)[0] is None


def test_sampled_answers_cached_when_configured() -> None:
    sampled = {**DETERMINISTIC, "temperature": 0.7}
    assert decide(sampled, cache=CacheConfig(deterministic_only=False))[0] == "exact"
    assert decide({**sampled, "n": 3}, cache=CacheConfig(deterministic_only=False))[0] is None


def test_ttl_and_threshold_per_model() -> None:
    p = plan(
        DETERMINISTIC, {}, CacheConfig(ttl_s=60), ModelPolicy(cache_ttl_s=5, cache_threshold=0.8)
    )
    assert (p.ttl_s, p.threshold) == (5, 0.8)
    p = plan(DETERMINISTIC, {}, CacheConfig(ttl_s=60, threshold=0.9), ModelPolicy())
    assert (p.ttl_s, p.threshold) == (60, 0.9)
