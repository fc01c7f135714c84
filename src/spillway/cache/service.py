"""The response cache as the request path sees it: probe, lookup, store, merge.

Nothing here may fail a request. Every lookup is bounded by ``[cache] lookup_timeout_s`` and
any error (Redis or PostgreSQL down, the embedder failing or still loading) is a miss; every
write happens after the client has its answer, in the background. Failures are logged once
when a component starts failing and once when it recovers, not once per request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from spillway.cache.answers import CachedAnswer
from spillway.cache.embedders import Embedder
from spillway.cache.keys import CacheKeys, derive
from spillway.cache.merging import InflightMerger
from spillway.cache.policy import CachePlan, plan
from spillway.cache.stores import CacheStore, Entry
from spillway.cache.vectors import Neighbour, Vector, VectorEntry, VectorIndex
from spillway.clock import Clock
from spillway.config.schema import CacheConfig, ModelPolicy

log = logging.getLogger("spillway.cache")

HitKind = Literal["exact", "semantic"]


class Matcher(Protocol):
    """Decides which (if any) nearby cached prompt means the same as the query."""

    async def best(
        self, query: str, qvec: Vector, neighbours: list[Neighbour], threshold: float
    ) -> Neighbour | None: ...


@dataclass(frozen=True, slots=True)
class Probe:
    """One request's business with the cache, settled before any I/O."""

    plan: CachePlan
    keys: CacheKeys | None  # None when the plan bypasses the cache
    tenant: str
    model: str
    private_only: bool
    #: why the cache does less than the request asked (a bypass, or no semantic lookup)
    note: str = ""


@dataclass(frozen=True, slots=True)
class Hit:
    kind: HitKind
    answer: CachedAnswer


@dataclass(slots=True)
class Lookup:
    hit: Hit | None = None
    #: the prompt's embedding, when one was made: storing the answer reuses it
    vector: Vector | None = None


@dataclass(frozen=True, slots=True)
class CacheStats:
    hits_exact: int
    hits_semantic: int
    misses: int
    bypassed: int
    errors: int
    stored: int
    merged: int


@dataclass
class _Counters:
    values: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("hits_exact", "hits_semantic", "misses", "bypassed", "errors", "stored"), 0
        )
    )

    def add(self, name: str) -> None:
        self.values[name] += 1


@dataclass(frozen=True, slots=True)
class Semantic:
    """The semantic half: an index, an embedder and a matcher (absent: exact only)."""

    index: VectorIndex
    embedder: Embedder
    matcher: Matcher
    neighbours: int
    #: the matcher's threshold when neither [cache] nor the model sets one
    default_threshold: float
    #: False until a slow embedder (the local model) has loaded; lookups are misses meanwhile
    ready: Callable[[], bool] = lambda: True


class ResponseCache:
    def __init__(
        self,
        config: CacheConfig,
        policies: Callable[[str], ModelPolicy],
        secret: bytes,
        store: CacheStore,
        semantic: Semantic | None,
        clock: Clock,
    ):
        self.config = config
        self._policies = policies
        self._secret = secret
        self.store = store
        self.semantic = semantic
        self._clock = clock
        self.merger = InflightMerger()
        self._counters = _Counters()
        self._failing: set[str] = set()
        self._writes: set[asyncio.Task[None]] = set()

    def probe(
        self,
        body: dict[str, Any],
        headers: Mapping[str, str],
        tenant: str,
        model: str,
        private_only: bool,
    ) -> Probe:
        """The plan and keys for one request (raises InvalidRequest for a bad header)."""
        decided = plan(body, headers, self.config, self._policies(model))
        if decided.bypass:
            self._counters.add("bypassed")
            return Probe(decided, None, tenant, model, private_only, decided.reason)
        keys = derive(self._secret, tenant, body)
        note = self._semantic_gap(private_only) if decided.mode == "semantic" else ""
        return Probe(decided, keys, tenant, model, private_only, note)

    async def lookup(self, probe: Probe) -> Lookup:
        """A hit, or a miss (also on any failure or when the lookup takes too long)."""
        found = Lookup()
        if probe.keys is None or not probe.plan.read:
            return found
        try:
            async with asyncio.timeout(self.config.lookup_timeout_s):
                found.hit = await self._find(probe, found)
        except Exception as exc:  # TimeoutError included: a slow backend is a miss
            self._failed("lookup", exc)
        else:
            self._recovered("lookup")
        self._counters.add(f"hits_{found.hit.kind}" if found.hit else "misses")
        return found

    def store_later(self, probe: Probe, answer: CachedAnswer, vector: Vector | None) -> None:
        """Store the answer after the response, in the background (never fails a request)."""
        if probe.keys is None or not probe.plan.write:
            return
        task = asyncio.create_task(self._store(probe, probe.keys, answer, vector))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    def describe(self) -> dict[str, Any]:
        """For /readyz: the configured mode, the semantic half's state, the counters.
        The cache never makes the gateway unready: a failing cache only means misses."""
        semantic = "off"
        if self.semantic is not None:
            semantic = "ready" if self.semantic.ready() else "loading"
        return {
            "mode": self.config.mode,
            "store": self.config.store,
            "semantic": semantic,
            "failing": sorted(self._failing),
            **asdict(self.statistics()),
        }

    def statistics(self) -> CacheStats:
        v = self._counters.values
        return CacheStats(
            v["hits_exact"],
            v["hits_semantic"],
            v["misses"],
            v["bypassed"],
            v["errors"],
            v["stored"],
            self.merger.statistics().merged,
        )

    async def aclose(self) -> None:
        """Finish pending writes (briefly), then close the backends."""
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=5.0)
        await self.store.aclose()
        if self.semantic is not None:
            await self.semantic.index.aclose()
            await self.semantic.embedder.aclose()

    async def _find(self, probe: Probe, found: Lookup) -> Hit | None:
        assert probe.keys is not None
        raw = await self.store.get(probe.keys.exact)
        if raw is not None:
            return Hit("exact", CachedAnswer.from_bytes(raw))
        semantic = self._semantic_for(probe)
        if semantic is None or probe.keys.scope is None or probe.keys.prompt is None:
            return None
        found.vector = (await semantic.embedder.embed([probe.keys.prompt]))[0]
        near = await semantic.index.search(probe.keys.scope, found.vector, semantic.neighbours)
        threshold = probe.plan.threshold or semantic.default_threshold
        best = await semantic.matcher.best(probe.keys.prompt, found.vector, near, threshold)
        if best is None:
            return None
        raw = await self.store.get(best.key)
        return Hit("semantic", CachedAnswer.from_bytes(raw)) if raw is not None else None

    def _semantic_gap(self, private_only: bool) -> str:
        """Why a request that asks for semantic lookups gets exact ones only ("" if it won't)."""
        semantic = self.semantic
        if semantic is None:
            return (
                'semantic lookups are off on this gateway (no model has cache = "semantic" '
                "in its configuration); exact lookups only"
            )
        if not semantic.ready():
            return "the semantic models are loading or failed to load; exact lookups only"
        if private_only and not semantic.embedder.private:
            return (
                "this key is private_only and the semantic embedder is a cloud node; "
                "exact lookups only"
            )
        return ""

    def _semantic_for(self, probe: Probe) -> Semantic | None:
        semantic = self.semantic
        if probe.plan.mode != "semantic" or semantic is None or not semantic.ready():
            return None
        if probe.private_only and not semantic.embedder.private:
            return None  # a private prompt is never sent to a cloud embedder
        return semantic

    async def _store(
        self, probe: Probe, keys: CacheKeys, answer: CachedAnswer, vector: Vector | None
    ) -> None:
        expires_at = self._clock.wall() + probe.plan.ttl_s
        entry = Entry(keys.exact, probe.tenant, probe.model, answer.to_bytes(), expires_at)
        try:
            await self.store.set(entry)
            await self._index(probe, keys, vector, expires_at)
        except Exception as exc:
            self._failed("store", exc)
            return
        self._recovered("store")
        self._counters.add("stored")

    async def _index(
        self, probe: Probe, keys: CacheKeys, vector: Vector | None, expires_at: float
    ) -> None:
        """Add the prompt to the semantic index when this request is semantic."""
        semantic = self._semantic_for(probe)
        if semantic is None or keys.scope is None or keys.prompt is None:
            return
        if vector is None:
            vector = (await semantic.embedder.embed([keys.prompt]))[0]
        entry = VectorEntry(
            keys.exact, keys.scope, probe.tenant, probe.model, keys.prompt, vector, expires_at
        )
        await semantic.index.add(entry)

    def _failed(self, what: str, exc: BaseException) -> None:
        self._counters.add("errors")
        if what not in self._failing:
            self._failing.add(what)
            reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
            log.warning("cache %s failing (%s); serving misses until it recovers", what, reason)

    def _recovered(self, what: str) -> None:
        if what in self._failing:
            self._failing.discard(what)
            log.info("cache %s recovered", what)
