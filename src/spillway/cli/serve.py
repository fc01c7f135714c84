"""``spillway serve``: run the gateway until SIGTERM or Ctrl-C, then stop cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
from collections.abc import Mapping
from pathlib import Path

import click
from aiohttp import web

from spillway.cli.common import config_option, load_or_exit, setup_logging
from spillway.config.schema import Config
from spillway.errors import StartupError
from spillway.server import listener
from spillway.server.app import build_app, open_to_network_warning

log = logging.getLogger("spillway")


@click.command()
@config_option
@click.option("--host", default=None, help="Address to listen on (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port to listen on (default 8000).")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Where spillway keeps its data and node logs (default ./.spillway).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Gateway processes sharing the port (what is per worker: docs/performance.md).",
)
def serve(
    config_path: Path | None,
    host: str | None,
    port: int | None,
    data_dir: Path | None,
    workers: int,
) -> None:
    """Run the gateway (the embedded default when no config file is found)."""
    config = load_or_exit(config_path, {"host": host, "port": port, "data_dir": data_dir})
    setup_logging(config)
    warning = open_to_network_warning(config)
    if warning:
        log.warning(warning)
    nodes = ", ".join(f"{name} ({spec.kind})" for name, spec in config.nodes.items())
    log.info("starting with nodes: %s", nodes)
    try:
        if workers == 1:
            run_server(config)
        else:
            from spillway.cli.workers import run_workers

            run_workers(config, workers)
    except StartupError as exc:
        log.error("%s", exc.message)
        sys.exit(1)


def run_server(
    config: Config,
    reuse_port: bool = False,
    supervised: Mapping[str, Path] | None = None,
    processes: int = 1,
) -> None:
    """One gateway process, serving until SIGTERM or SIGINT. ``supervised``: managed nodes
    the parent of ``--workers`` runs, with their status files; ``processes``: the workers."""
    if reuse_port:
        setup_logging(config)  # a spawned worker starts with fresh logging
    app = build_app(config, supervised=supervised, processes=processes)
    app.on_startup.append(_freeze_startup_objects)  # after the gateway is built
    # What web.run_app does, with spillway's listener (server/listener.py: the connection
    # cap and idle timeouts), which run_app has no way to take.
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    main = loop.create_task(_serve(app, config, reuse_port))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):  # SIGTERM or SIGINT (handle_signals)
        pass
    finally:
        _stop(loop, main)


async def _serve(app: web.Application, config: Config, reuse_port: bool) -> None:
    server = config.server
    access_log = logging.getLogger("spillway.access") if server.access_log else None
    runner = await listener.start(
        app, server, reuse_port=reuse_port, access_log=access_log, handle_signals=True
    )
    try:
        log.info(
            "spillway ready on http://%s:%d/v1 (models: %s)",
            server.host,
            server.port,
            ", ".join(config.public_models()),
        )
        await asyncio.Event().wait()  # until a signal raises GracefulExit
    finally:
        await runner.cleanup()  # stops listening, drains for listener.SHUTDOWN_GRACE_S


def _stop(loop: asyncio.AbstractEventLoop, main: asyncio.Task[None]) -> None:
    """As web.run_app ends: the server's own shutdown first (in ``main``, so in-flight
    requests get their grace), and only then whatever tasks are left."""
    try:
        if not main.done():
            main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(main)
    finally:
        rest = asyncio.all_tasks(loop)
        for task in rest:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


#: Net new container objects between young collections (CPython's default is 700).
YOUNG_GC_THRESHOLD = 20_000


async def _freeze_startup_objects(_app: web.Application) -> None:
    """Move everything built at start-up (modules, config, SQLAlchemy's and pydantic's
    machinery: about 100,000 objects) out of the garbage collector's sight. They live as long
    as the process, and a full collection scanning them took 60 ms on the 2-core benchmark
    machine: a stall for every request in flight, every few tens of thousands of requests.

    Then collect the young generation far less often. A request's objects are freed by
    reference counting when it ends; at the default threshold the collector still ran
    about once per 30 requests under load, each time tracing every in-flight request's
    objects: 15 µs per request in all (bench, c=64). At 20,000 it did not run once in 35,000
    requests; garbage in reference cycles (rare on the request path) waits a little longer."""
    gc.freeze()
    gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
