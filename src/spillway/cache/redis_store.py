"""The shared exact-answer store on Redis (``redis.asyncio``).

Layout, under a namespace ``ns`` (default ``spillway``):

- ``{ns}:cache:e:{key}``: one hash per entry, ``v`` (the value), ``t``/``m`` (tenant and
  model tags: the first 16 hex digits of their SHA-256, so any name fits) and ``h`` (hits),
  with a PEXPIRE at ``expires_at``. The key alone names it, because ``get`` is given no more.
- ``{ns}:cache:names``: tag -> name, so ``stats`` can print names.

``get`` is one round trip (a Lua script: HGET the value, HINCRBY the hits when present; the read
also refreshes Redis's own LRU clock for the key). ``set`` is one MULTI (replace the hash, set
its expiry, record the names). ``clear`` and ``stats`` SCAN the namespace's entries in batches
of 1,000 and read their tags in one pipeline per batch: O(entries), for operators, not requests.

Failures: every Redis error, refused connection or timeout surfaces as ``ConnectionError``, its
message naming the server with the password masked. ``get``, ``set`` and ``open`` are bounded
by ``timeout_s`` end to end; ``clear`` and ``stats`` by ``timeout_s`` per round trip. Retries
are off: an outage costs one failed call, which ``cache.service`` turns into a miss.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from spillway.cache.keys import tag
from spillway.cache.stores import Entry, ScopeStats
from spillway.clock import Clock
from spillway.secrets import Redactor, redacted_url
from spillway.state.resp import text

POOL_SIZE = 32
_SCAN_BATCH = 1_000
_NAMESPACE = re.compile(r"[A-Za-z0-9_.-]+")  # no glob characters: it is part of a SCAN MATCH
#: KEYS[1] is the entry; the hit is counted only if it exists (HINCRBY would create it).
_GET_SCRIPT = """
local v = redis.call('HGET', KEYS[1], 'v')
if v then redis.call('HINCRBY', KEYS[1], 'h', 1) end
return v
"""


def _connect(url: str, timeout_s: float, pool_size: int) -> Redis:
    """A client whose every wait is bounded by ``timeout_s`` and that never retries (an
    outage costs one failed call). Blocking pool: a burst past ``pool_size`` waits, within
    the timeout, for a connection, where the default pool would fail the call at once."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=pool_size,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )
    return Redis.from_pool(pool)


class RedisCacheStore:
    """``CacheStore`` on one Redis server, shared by any number of gateways.

    The size cap and LRU eviction are Redis's own: give the server a ``maxmemory`` and
    ``maxmemory-policy allkeys-lru`` (or ``volatile-lru``: every entry has a TTL). Entries are
    then evicted by Redis's approximate LRU, which ``get`` keeps informed. The names hash may be
    evicted too; it is rewritten by every ``set``, and ``stats`` falls back to tags meanwhile.
    """

    def __init__(
        self, url: str, clock: Clock, *, timeout_s: float = 0.25, namespace: str = "spillway"
    ):
        if not _NAMESPACE.fullmatch(namespace):
            raise ValueError(f"cache namespace {namespace!r}: use letters, digits, '_.-'")
        self._clock = clock
        self._timeout_s = timeout_s
        self._where = redacted_url(url)
        self._redactor = Redactor([p for p in (urlsplit(url).password,) if p])
        self._prefix = f"{namespace}:cache:e:"
        self._names = f"{namespace}:cache:names"
        with self._failures("connect"):
            self._redis = _connect(url, timeout_s, POOL_SIZE)
        self._get = self._redis.register_script(_GET_SCRIPT)

    async def open(self) -> None:
        with self._failures("ping"):
            async with asyncio.timeout(self._timeout_s):
                await self._redis.ping()

    async def get(self, key: str) -> bytes | None:
        with self._failures("get"):
            async with asyncio.timeout(self._timeout_s):
                value = await self._get(keys=[self._prefix + key])
        return value if isinstance(value, bytes) else None

    async def set(self, entry: Entry) -> None:
        ttl_ms = int((entry.expires_at - self._clock.wall()) * 1000)
        name = self._prefix + entry.key
        with self._failures("set"):
            async with asyncio.timeout(self._timeout_s):
                pipe = self._redis.pipeline(transaction=True)
                pipe.delete(name)  # a replacement starts again from zero hits
                if ttl_ms > 0:  # an entry born expired only removes the old one
                    tenant, model = tag(entry.tenant), tag(entry.model)
                    fields = {"v": entry.value, "t": tenant, "m": model, "h": 0}
                    pipe.hset(name, mapping=fields)  # type: ignore[arg-type]
                    pipe.pexpire(name, ttl_ms)
                    pipe.hset(self._names, mapping={tenant: entry.tenant, model: entry.model})
                await pipe.execute()

    async def clear(self, tenant: str | None = None, model: str | None = None) -> int:
        wanted = (None if tenant is None else tag(tenant), None if model is None else tag(model))
        deleted = 0
        with self._failures("clear"):
            async for batch in self._scan():
                if wanted != (None, None):
                    tags = await self._tags(batch)
                    batch = [
                        name
                        for name, (t, m, _h, _s) in zip(batch, tags, strict=True)
                        if wanted[0] in (None, t) and wanted[1] in (None, m)
                    ]
                if batch:
                    deleted += await self._redis.unlink(*batch)
        return deleted

    async def stats(self) -> list[ScopeStats]:
        totals: dict[tuple[str, str], list[int]] = {}
        with self._failures("stats"):
            async for batch in self._scan():
                for t, m, hits, size in await self._tags(batch):
                    if t and m:  # gone since the scan listed it
                        row = totals.setdefault((t, m), [0, 0, 0])
                        row[0] += 1
                        row[1] += size
                        row[2] += hits
            raw = await self._redis.hgetall(self._names)
        names = {text(k): text(v) for k, v in raw.items()}
        found = [
            ScopeStats(names.get(t, t), names.get(m, m), entries=n, bytes=b, hits=h)
            for (t, m), (n, b, h) in totals.items()
        ]
        return sorted(found, key=lambda s: (s.tenant, s.model))

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def _scan(self) -> AsyncIterator[list[bytes | str]]:
        cursor = 0
        while True:
            cursor, names = await self._redis.scan(
                cursor, match=self._prefix + "*", count=_SCAN_BATCH
            )
            if names:
                yield names
            if cursor == 0:
                return

    async def _tags(self, names: list[bytes | str]) -> list[tuple[str, str, int, int]]:
        """(tenant tag, model tag, hits, value bytes) of each entry; empty tags if gone."""
        pipe = self._redis.pipeline(transaction=False)
        for name in names:
            pipe.hmget(name, ["t", "m", "h"])
            pipe.hstrlen(name, "v")
        replies = await pipe.execute()
        out = []
        for (t, m, h), size in zip(replies[::2], replies[1::2], strict=True):
            out.append((text(t or b""), text(m or b""), int(h or 0), size))
        return out

    @contextlib.contextmanager
    def _failures(self, doing: str) -> Iterator[None]:
        """The one place Redis's exceptions become ours, without the password."""
        try:
            yield
        except (RedisError, OSError, TimeoutError) as exc:
            detail = self._redactor.scrub(str(exc)) or "timed out"
            message = (
                f"redis cache at {self._where}: {doing} failed: {type(exc).__name__}: {detail}"
            )
            raise ConnectionError(message) from None
