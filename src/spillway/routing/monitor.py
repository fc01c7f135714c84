"""Background watchers: engine load signals, and active probes that re-admit ejected nodes.

Neither ever blocks a request: the router reads whatever they last learnt, and a signal that
is missing or stale simply leaves the ranking to spillway's own in-flight counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from spillway.errors import UpstreamError
from spillway.routing.router import NodeHandle, Router

log = logging.getLogger("spillway.routing")

PROBE_TIMEOUT_S = 2.0


class NodeMonitor:
    """Polls engine metrics every ``signal_interval_s`` and probes open nodes every
    ``probe_interval_s``. Start with ``start()``, stop with ``aclose()``."""

    def __init__(
        self,
        router: Router,
        signal_interval_s: float,
        probe_interval_s: float,
        on_change: Callable[[NodeHandle], None],
    ):
        self.router = router
        self.signal_interval_s = signal_interval_s
        self.probe_interval_s = probe_interval_s
        self.on_change = on_change
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        watched = [h for h in self.router.handles if h.metrics is not None]
        self._tasks += [asyncio.create_task(self._poll(h)) for h in watched]
        self._tasks.append(asyncio.create_task(self._probe_loop(), name="probes"))

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _poll(self, handle: NodeHandle) -> None:
        """Read the node's metrics (its source is closed with the node, not here)."""
        source = handle.metrics
        assert source is not None  # only nodes with a metrics source are polled
        timeout = min(self.signal_interval_s, 2.0)
        while True:
            load = await source.fetch_load(handle.load_signal, timeout)
            self.router.observe_engine(handle, load)
            self.on_change(handle)
            await asyncio.sleep(self.signal_interval_s)

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval_s)
            open_nodes = set(self.router.board.open_nodes())
            await asyncio.gather(
                *(self._probe(h) for h in self.router.handles if h.name in open_nodes)
            )

    async def _probe(self, handle: NodeHandle) -> None:
        try:
            await handle.node.probe(PROBE_TIMEOUT_S)
        except UpstreamError:
            return
        log.info("node %s answers its health probe again; admitting trial requests", handle.name)
        self.router.board.mark_recovered(handle.name)
        self.on_change(handle)
