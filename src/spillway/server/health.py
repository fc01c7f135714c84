"""Readiness: is every public model served by at least one node that answers right now?

``/readyz`` needs no key, so it shows only spillway's own words about a node ("HTTP 500",
"cannot connect (ConnectionRefusedError)", "no answer to GET /models within 2 s"), never
the node's: an error body may carry anything the node chose to send, its key included. The
node's full error goes to the log when that summary changes.

With shared state configured, ``state`` says whether its Redis answers: ``"ok"``, or
``"degraded"`` while it does not. Degraded is still ready (200): every replica loses the same
Redis at once, and a load balancer that drained them all would turn a limits problem into an
outage; the replicas serve on with their local share of the limits meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from spillway.clock import Clock
from spillway.errors import (
    UpstreamBadAnswer,
    UpstreamConnectError,
    UpstreamError,
    UpstreamRejected,
    UpstreamStatusError,
    UpstreamTimeout,
)
from spillway.routing.router import NodeHandle, Router
from spillway.state.redis import SharedState

log = logging.getLogger("spillway.health")

PROBE_TIMEOUT_S = 2.0
#: Probe results are reused this long, so a scraping load balancer cannot flood the nodes.
PROBE_TTL_S = 1.0


@dataclass(frozen=True, slots=True)
class NodeHealth:
    up: bool
    checked_at: float
    #: what /readyz shows: spillway's own words only
    error: str | None = None
    #: the whole error, the node's words included (scrubbed of its key): for the log
    detail: str | None = None


class HealthBoard:
    def __init__(self, router: Router, clock: Clock, shared: SharedState | None = None):
        self._router = router
        self._clock = clock
        self._shared = shared
        self._last: dict[str, NodeHealth] = {}
        self._lock = asyncio.Lock()

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, body): ready when every model has a node that answered its probe."""
        async with self._lock:
            if self._stale():
                await self._probe_all()
        models = {
            model: any(self._up(h) for h in self._router.serving(model))
            for model in self._router.models()
        }
        nodes = {h.name: self._describe(h) for h in self._router.handles}
        ready = all(models.values())
        body: dict[str, Any] = {"ready": ready, "models": models, "nodes": nodes}
        if self._shared is not None:
            body["state"] = "degraded" if self._shared.degraded else "ok"
        return ready, body

    def _stale(self) -> bool:
        now = self._clock.monotonic()
        return len(self._last) < len(self._router.handles) or any(
            now - h.checked_at > PROBE_TTL_S for h in self._last.values()
        )

    async def _probe_all(self) -> None:
        results = await asyncio.gather(*(self._probe(h) for h in self._router.handles))
        fresh = {h.name: r for h, r in zip(self._router.handles, results, strict=True)}
        for name, result in fresh.items():
            before = self._last.get(name)
            # Once per change of spillway's own words, not per probe: a load balancer scrapes
            # /readyz every second, and a node's text may differ each time (request ids).
            if result.detail is not None and (before is None or before.error != result.error):
                log.warning("node %s: readiness probe failed: %s", name, result.detail)
        self._last = fresh

    async def _probe(self, handle: NodeHandle) -> NodeHealth:
        now = self._clock.monotonic()
        try:
            await handle.node.probe(PROBE_TIMEOUT_S)
        except UpstreamError as exc:
            return NodeHealth(False, now, _own_words(exc), exc.detail)
        return NodeHealth(True, now)

    def _up(self, handle: NodeHandle) -> bool:
        """Answered its probe, and (for a managed node) its process serves."""
        return self._last[handle.name].up and handle.out_of_service() is None

    def _describe(self, handle: NodeHandle) -> dict[str, Any]:
        health = self._last[handle.name]
        down = handle.out_of_service()
        info: dict[str, Any] = {
            "kind": handle.kind,
            "state": "failed" if down is not None else "up" if health.up else "down",
            "models": sorted(handle.models),
            "in_flight": handle.in_flight,
        }
        if down is not None:
            info["error"] = down.reason or f"process {down.state}"
        elif health.error:
            info["error"] = health.error
        if handle.process is not None:
            info["managed"] = handle.process.status().describe(self._clock.wall())
        return info


def _own_words(exc: UpstreamError) -> str:
    """What spillway itself says about a failed probe, without one word from the node."""
    if isinstance(exc, UpstreamStatusError):
        return f"HTTP {exc.upstream_status}"
    if isinstance(exc, UpstreamRejected):
        return f"HTTP {exc.status}"
    if isinstance(exc, UpstreamTimeout | UpstreamConnectError | UpstreamBadAnswer):
        return exc.detail  # made in nodes/http.py from spillway's words alone
    return type(exc).__name__  # a class that may carry the node's words: its name only
