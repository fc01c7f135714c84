"""Building the response cache from ``[cache]``: its secret, store, index and embedder.

A cache backend that is down at start-up does not stop the gateway: it is logged, and the
cache serves misses until the backend answers (each lookup tries again, within its timeout).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from spillway.cache import cross_matcher, minilm
from spillway.cache.cosine import CosineMatcher
from spillway.cache.cross_matcher import CrossEncoderMatcher
from spillway.cache.remote_embedder import NodeEmbedder
from spillway.cache.service import Matcher, ResponseCache, Semantic
from spillway.cache.stores import CacheStore
from spillway.cache.vectors import VectorIndex
from spillway.clock import Clock
from spillway.config.schema import CacheConfig, Config
from spillway.routing.router import Router
from spillway.secrets import secret_file

if TYPE_CHECKING:
    from spillway.cache.local_embedder import LocalMiniLM

log = logging.getLogger("spillway.cache")

SECRET_FILE = "cache.key"


async def build_cache(
    config: Config, router: Router, clock: Clock, stack: AsyncExitStack
) -> ResponseCache:
    settings, data_dir = config.cache, config.server.data_dir
    store = await _started(make_store(settings, data_dir, clock), "store")
    semantic = None
    if uses_semantic(config):
        semantic = await _semantic(settings, data_dir, router, clock, stack)
    cache = ResponseCache(
        settings, config.policy_for, cache_secret(settings, data_dir), store, semantic, clock
    )
    stack.push_async_callback(cache.aclose)
    return cache


def uses_semantic(config: Config) -> bool:
    """Semantic machinery (an embedder, an index) loads only when some model asks for it."""
    modes = {config.cache.mode, *(p.cache for p in config.models.values())}
    return "semantic" in modes


def cache_secret(settings: CacheConfig, data_dir: Path) -> bytes:
    """``[cache] secret``, else a random key made once in DATA_DIR/cache.key (mode 0600),
    shared by every worker and restart that uses the same data dir."""
    if settings.secret is not None:
        return settings.secret.get_secret_value().encode()
    path = data_dir / SECRET_FILE
    secret = secret_file(path).encode()
    if len(secret) < 32:
        raise OSError(f"{path} holds no usable cache secret; delete it to make a new one")
    return secret


def make_store(settings: CacheConfig, data_dir: Path, clock: Clock) -> CacheStore:
    if settings.store == "redis":
        from spillway.cache.redis_store import RedisCacheStore

        assert settings.redis_url is not None  # the schema requires it
        return RedisCacheStore(settings.redis_url.get_secret_value(), clock)
    from spillway.cache.sqlite_store import SqliteCacheStore

    return SqliteCacheStore(data_dir / "cache.db", clock, settings.max_entries, settings.max_bytes)


def make_index(settings: CacheConfig, data_dir: Path, clock: Clock) -> VectorIndex:
    dim = settings.embedding_dim
    if settings.index == "pgvector":
        from spillway.cache.pgvector_index import PgVectorIndex

        assert settings.pgvector_url is not None  # the schema requires it
        return PgVectorIndex(settings.pgvector_url.get_secret_value(), clock, dim)
    from spillway.cache.numpy_index import NumpyIndex, one_blas_thread

    if not one_blas_thread():
        log.warning("threadpoolctl is missing: numpy's BLAS threads may slow semantic lookups")
    return NumpyIndex(data_dir / "semantic.db", clock, dim, max_entries=settings.max_entries)


async def _semantic(
    settings: CacheConfig, data_dir: Path, router: Router, clock: Clock, stack: AsyncExitStack
) -> Semantic:
    index = await _started(make_index(settings, data_dir, clock), "semantic index")
    if settings.local_embedder:
        return _local(settings, index, stack)
    handle = next(h for h in router.handles if h.name == settings.embedder)
    assert settings.embedding_model is not None and settings.threshold is not None
    embedder = NodeEmbedder(handle.node, settings.embedding_model, handle.private, handle.timeouts)
    matcher = CosineMatcher()
    return Semantic(index, embedder, matcher, settings.neighbours, settings.threshold)


def _local(settings: CacheConfig, index: VectorIndex, stack: AsyncExitStack) -> Semantic:
    """all-MiniLM-L6-v2 finds candidates; the verifier, and unless turned off the
    cross-encoder, judge them. The models load in the background (about a second) and semantic
    lookups are misses until they have."""
    from spillway.cache.local_embedder import LocalMiniLM

    embedder = LocalMiniLM()
    matcher, threshold = _local_matcher(settings, embedder)
    warming = asyncio.create_task(_warm(embedder, matcher))
    warming.add_done_callback(_report_warm)
    stack.callback(warming.cancel)
    return Semantic(index, embedder, matcher, settings.neighbours, threshold, _loaded(warming))


def _local_matcher(settings: CacheConfig, embedder: LocalMiniLM) -> tuple[Matcher, float]:
    """The matcher and its default threshold (a blended score, or the verifier's alone)."""
    if settings.cross_encoder:
        return CrossEncoderMatcher(embedder), cross_matcher.DEFAULT_THRESHOLD
    from spillway.cache import verifier

    return verifier.SemanticMatcher(verifier.Verifier.load()), verifier.DEFAULT_THRESHOLD


async def _warm(embedder: LocalMiniLM, matcher: Matcher) -> None:
    await embedder.warm()
    if isinstance(matcher, CrossEncoderMatcher):  # its model loads on the embedder's thread
        await matcher.warm()
    # The models' modules (onnx, onnxruntime, tokenizers) add objects that live as long as
    # the process; `serve` froze start-up's before they loaded. Frozen, full collections
    # skip them.
    gc.freeze()
    minilm.release_freed_memory()


def _loaded(task: asyncio.Task[None]) -> Callable[[], bool]:
    return lambda: task.done() and not task.cancelled() and task.exception() is None


def _report_warm(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    if task.exception() is not None:
        reason = task.exception()
        what = "the local embedder or cross-encoder"
        log.error("semantic cache disabled: %s failed to load: %s", what, reason)
    else:
        log.info("semantic cache ready (local all-MiniLM-L6-v2)")


class _Opens(Protocol):
    async def open(self) -> None: ...


_B = TypeVar("_B", bound=_Opens)


async def _started(backend: _B, what: str) -> _B:
    try:
        await backend.open()
    except Exception as exc:
        reason = type(exc).__name__
        log.warning("cache %s unavailable at start-up (%s); misses until it answers", what, reason)
    return backend
