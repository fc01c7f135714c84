"""``spillway serve --workers N``: N gateway processes on one port (SO_REUSEPORT).

The parent process owns what must exist once: it starts and supervises the managed llama.cpp
nodes, then spawns N workers, each a full gateway bound to the same port; the kernel spreads
connections across them. A worker that dies is replaced. SIGTERM or Ctrl-C stops the workers
(each finishes its requests and flushes its ledger), then the managed nodes.

Per worker, not shared: in-flight counts, breakers, retry budgets, wait queues, budget
reservations and TTFT averages. Shared: the nodes, and the ledger (one SQLite file in WAL
mode, or PostgreSQL), from which every worker loads each key's spend at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
from contextlib import AsyncExitStack
from multiprocessing.context import SpawnProcess
from pathlib import Path

from spillway.clock import SystemClock
from spillway.config.schema import Config
from spillway.nodes.managed import ManagedLlamaServer, die_with_parent
from spillway.nodes.process_status import StatusFile

log = logging.getLogger("spillway")
_SPAWN = multiprocessing.get_context("spawn")


def run_workers(config: Config, workers: int) -> None:
    asyncio.run(_supervise(config, workers))


async def _supervise(config: Config, workers: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with AsyncExitStack() as stack:
        resolved, supervised = await _start_managed_nodes(config, stack)
        procs = [_spawn(resolved, supervised, i, workers) for i in range(workers)]
        log.info("started %d workers on port %d", workers, config.server.port)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            for i, proc in enumerate(procs):
                if not proc.is_alive() and not stop.is_set():
                    log.warning("worker %d exited with %s; starting a new one", i, proc.exitcode)
                    procs[i] = _spawn(resolved, supervised, i, workers)
        await asyncio.to_thread(_stop_all, procs)


async def _start_managed_nodes(
    config: Config, stack: AsyncExitStack
) -> tuple[Config, dict[str, Path]]:
    """Start each managed node once, here, and give the workers its address instead, and
    the file where this process keeps its status (so each worker's router and /readyz know
    when it is down)."""
    nodes = dict(config.nodes)
    supervised: dict[str, Path] = {}
    clock = SystemClock()
    for name, spec in config.nodes.items():
        if spec.managed is None:
            continue
        status_path = config.server.data_dir / "run" / f"node-{name}.{os.getpid()}.json"
        supervised[name] = status_path
        logs = config.server.data_dir / "logs"
        status = StatusFile(status_path, clock.monotonic)
        key = spec.api_key.get_secret_value() if spec.api_key else None
        server = ManagedLlamaServer(
            name, spec.managed, logs, clock, status_file=status, api_key=key
        )
        stack.callback(status_path.unlink, missing_ok=True)
        await server.start()
        stack.push_async_callback(server.aclose)
        tokenizer = spec.tokenizer or server.model_path
        nodes[name] = spec.model_copy(
            update={"managed": None, "base_url": server.base_url, "tokenizer": tokenizer}
        )
    return config.model_copy(update={"nodes": nodes}), supervised


def _spawn(config: Config, supervised: dict[str, Path], index: int, workers: int) -> SpawnProcess:
    proc = _SPAWN.Process(
        target=_worker_main, args=(config, supervised, workers), name=f"spillway-worker-{index}"
    )
    proc.start()
    return proc


def _stop_all(procs: list[SpawnProcess], grace_s: float = 40.0) -> None:
    for proc in procs:
        if proc.is_alive() and proc.pid is not None:
            proc.terminate()  # SIGTERM: the worker drains and flushes its ledger
    for proc in procs:
        proc.join(grace_s)
        if proc.is_alive():
            proc.kill()
            proc.join()


def _worker_main(config: Config, supervised: dict[str, Path], workers: int) -> None:
    from spillway.cli.serve import run_server

    # A session of its own: a terminal's Ctrl-C reaches only the parent, which stops the
    # workers in order; and a worker never outlives its parent.
    os.setsid()
    die_with_parent()
    run_server(config, reuse_port=True, supervised=supervised, processes=workers)
