"""Whether (and how) one request may use the cache: a pure function of its body, its headers
and the configuration.

- The model's mode (``[models.NAME] cache``, else ``[cache] mode``) of ``off`` is final.
- Otherwise the client may choose with ``x-spillway-cache: off|exact|semantic``.
- ``Cache-Control: no-store`` neither reads nor writes; ``no-cache`` skips the lookup but
  stores the fresh answer (HTTP's meaning: do not answer from a cache without going upstream).
- Only deterministic requests (``temperature`` 0) are cached unless
  ``deterministic_only = false``: a sampled answer is one draw, not *the* answer.
- ``n > 1`` and ``logprobs`` are never cached: one stored answer cannot stand for several
  choices, and replaying token log-probabilities as a stream is not something we fake.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from spillway.config.schema import CacheConfig, ModelPolicy
from spillway.errors import InvalidRequest

MODE_HEADER = "x-spillway-cache"
LookupMode = Literal["exact", "semantic"]
_MODES = ("off", "exact", "semantic")


@dataclass(frozen=True, slots=True)
class CachePlan:
    """What the cache may do for one request. ``mode`` None means bypass it entirely."""

    mode: LookupMode | None
    read: bool = False
    write: bool = False
    ttl_s: float = 0.0
    threshold: float | None = None
    reason: str = ""

    @property
    def bypass(self) -> bool:
        return self.mode is None


def plan(
    body: dict[str, Any],
    headers: Mapping[str, str],
    cache: CacheConfig,
    model: ModelPolicy,
) -> CachePlan:
    configured = model.cache or cache.mode
    if configured == "off":
        return _OFF
    mode = _asked_mode(headers) or configured
    if mode == "off":
        return CachePlan(None, reason=f"{MODE_HEADER}: off")
    directives = _cache_control(headers)
    if "no-store" in directives:
        return CachePlan(None, reason="Cache-Control: no-store")
    unfit = _unfit(body, cache)
    if unfit:
        return CachePlan(None, reason=unfit)
    return CachePlan(
        mode,  # type: ignore[arg-type]  # "off" returned above
        read="no-cache" not in directives,
        write=True,
        ttl_s=model.cache_ttl_s or cache.ttl_s,
        threshold=model.cache_threshold or cache.threshold,
    )


#: One plan for every request to a model whose caching is off: nothing to decide per request.
_OFF = CachePlan(None, reason="caching is off for this model")


def _asked_mode(headers: Mapping[str, str]) -> str | None:
    asked = headers.get(MODE_HEADER)
    if asked is None:
        return None
    mode = asked.strip().lower()
    if mode not in _MODES:
        raise InvalidRequest(
            f"Header {MODE_HEADER} must be one of off, exact or semantic (got {asked[:40]!r}).",
            param=MODE_HEADER,
        )
    return mode


def _cache_control(headers: Mapping[str, str]) -> set[str]:
    value = headers.get("cache-control", "")
    return {part.strip().lower().split("=", 1)[0] for part in value.split(",") if part.strip()}


def _unfit(body: dict[str, Any], cache: CacheConfig) -> str:
    """Why this body may not be cached, or "" when it may."""
    n = body.get("n")
    if isinstance(n, int) and n > 1:
        return "n > 1"
    if body.get("logprobs") or body.get("top_logprobs"):
        return "logprobs requested"
    if cache.deterministic_only:
        temperature = body.get("temperature", 1)
        if isinstance(temperature, bool) or temperature != 0:
            return "not deterministic (temperature is not 0)"
    return ""
