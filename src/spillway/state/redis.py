"""The Redis that replicas share (``[state] redis_url``): bounded calls, an outage as a state.

Every call waits at most ``timeout_s`` (default 250 ms). A call that fails or times out
marks the state *down*: from then on calls fail at once, without touching Redis, and the
callers use their local fallback; one call a second (or the heartbeat) tries Redis again, and
the first that succeeds marks it *up*. So an outage costs at most one call's timeout a second,
never a wait per request and never a spin. The log says so once when an outage begins and
once when it ends; ``/readyz`` shows ``degraded`` meanwhile.

Each replica (each ``spillway serve`` process, each ``--workers`` worker) announces itself
every ``HEARTBEAT_S`` in the sorted set ``{ns}:replicas`` (score: when its entry expires, on
Redis's clock). ``replicas`` is the last count seen, which the fallbacks divide limits by.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlsplit

from spillway.clock import Clock
from spillway.secrets import Redactor, redacted_url
from spillway.state.resp import ReplyError, RespClient

log = logging.getLogger("spillway.state")

T = TypeVar("T")
HEARTBEAT_S = 2.0
#: a replica not heard from for this long no longer counts
REPLICA_TTL_S = 3 * HEARTBEAT_S
#: while down, how often one call tries Redis again
RETRY_S = 1.0
_NAMESPACE = re.compile(r"[A-Za-z0-9_.-]+")
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return redis.call('ZCARD', KEYS[1])
"""


class StateDown(Exception):
    """Redis did not answer in time, or is known to be down: use the local fallback."""


class SharedState:
    """One Redis connection pool for the state replicas share, and whether it is reachable."""

    def __init__(
        self, url: str, clock: Clock, *, timeout_s: float = 0.25, namespace: str = "spillway"
    ):
        if not _NAMESPACE.fullmatch(namespace):
            raise ValueError(f"state namespace {namespace!r}: use letters, digits, '_.-'")
        self.namespace = namespace
        self.replica_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._clock = clock
        self._timeout_s = timeout_s
        self._where = redacted_url(url)
        self._redactor = Redactor([p for p in (urlsplit(url).password,) if p])
        self.redis = RespClient(url)
        self._heartbeat = self.redis.register_script(_HEARTBEAT)
        self.replicas = 1
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._probing = False
        self._task: asyncio.Task[None] | None = None

    @property
    def degraded(self) -> bool:
        return self._down_since is not None

    def key(self, *parts: str) -> str:
        """``{ns}:part:…``. One hash tag for every key: a request's one script touches its
        node's, its key's and its budget's keys at once, and on a Redis Cluster a script may
        only touch keys of one slot."""
        return ":".join(("{" + self.namespace + "}", *parts))

    async def call(self, op: Callable[[RespClient], Awaitable[T]]) -> T:
        """``op`` on Redis within the timeout; ``StateDown`` at once while Redis is down
        (except for the one call a second that tries it again)."""
        probing = False
        if self._down_since is not None:
            if self._probing or self._clock.monotonic() < self._retry_at:
                raise StateDown(f"shared state at {self._where} is down")
            self._probing = probing = True
        try:
            async with asyncio.timeout(self._timeout_s):
                result = await op(self.redis)
        except (ReplyError, OSError, TimeoutError, ValueError) as exc:
            if isinstance(exc, TimeoutError):
                self.redis.reset()  # a server that stopped answering may never answer on it
            self._failed(exc)
            raise StateDown(f"shared state at {self._where}: {self._describe(exc)}") from None
        finally:
            if probing:
                self._probing = False
        if self._down_since is not None:
            self._recovered()
        return result

    async def open(self) -> None:
        """Announce this replica and learn how many there are; a Redis down at start is an
        outage like any other (the gateway starts degraded), not a failed start."""
        with contextlib.suppress(StateDown):
            await self._beat()
        self._task = asyncio.create_task(self._beat_forever(), name="state-heartbeat")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(StateDown):
            await self.call(lambda r: r.execute("ZREM", self.key("replicas"), self.replica_id))
        await self.redis.aclose()

    async def _beat(self) -> None:
        ttl_ms = str(int(REPLICA_TTL_S * 1000))
        count = await self.call(
            lambda _: self._heartbeat(keys=[self.key("replicas")], args=[self.replica_id, ttl_ms])
        )
        self.replicas = max(1, int(count))

    async def _beat_forever(self) -> None:
        while True:
            await self._clock.sleep(HEARTBEAT_S)
            with contextlib.suppress(StateDown):
                await self._beat()

    def _failed(self, exc: BaseException) -> None:
        self._retry_at = self._clock.monotonic() + RETRY_S
        if self._down_since is None:
            self._down_since = self._clock.monotonic()
            log.warning(
                "shared state: Redis at %s is unreachable (%s); each replica enforces its "
                "share of the limits (1/%d) until it answers again",
                self._where,
                self._describe(exc),
                self.replicas,
            )

    def _recovered(self) -> None:
        assert self._down_since is not None
        log.warning(
            "shared state: Redis at %s answers again after %.1f s; limits are fleet-wide again",
            self._where,
            self._clock.monotonic() - self._down_since,
        )
        self._down_since = None

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            return f"no answer within {self._timeout_s:g} s"
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return self._redactor.scrub(text)
