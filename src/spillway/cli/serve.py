"""``spillway serve``: run the gateway until SIGTERM or Ctrl-C, then stop cleanly."""

from __future__ import annotations

import asyncio
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
from spillway.server.app import build_app, open_to_network_warning

log = logging.getLogger("spillway")

#: How long in-flight requests get to finish after SIGTERM before they are cut.
SHUTDOWN_GRACE_S = 30.0


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
    config: Config, reuse_port: bool = False, supervised: Mapping[str, Path] | None = None
) -> None:
    """One gateway process, serving until SIGTERM or SIGINT. ``supervised``: managed nodes
    the parent of ``--workers`` runs, with their status files."""
    if reuse_port:
        setup_logging(config)  # a spawned worker starts with fresh logging
    server = config.server
    app = build_app(config, supervised=supervised)
    app.on_startup.append(_freeze_startup_objects)  # after the gateway is built
    web.run_app(
        app,
        host=server.host,
        port=server.port,
        reuse_port=reuse_port or None,
        access_log=logging.getLogger("spillway.access") if server.access_log else None,
        handler_cancellation=True,  # a client that goes away cancels its upstream call
        shutdown_timeout=SHUTDOWN_GRACE_S,
        loop=_new_loop(),
        print=lambda _: log.info(
            "spillway ready on http://%s:%d/v1 (models: %s)",
            server.host,
            server.port,
            ", ".join(config.public_models()),
        ),
    )


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
