"""Running the real spillway app in-process, in front of fake or real upstreams."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import openai
from aiohttp import web

from spillway.config.load import validate
from spillway.config.schema import Config
from spillway.server.app import build_app
from spillway.server.listener import AccessLog
from spillway.server.state import GATEWAY, Gateway


@dataclass
class RunningGateway:
    base_url: str
    app: web.Application
    #: Closed with the gateway: left to the garbage collector, a client closes itself on
    #: whatever loop runs then, a later test's, and logs an error there.
    clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.base_url.removesuffix("/v1")

    @property
    def gateway(self) -> Gateway:
        return self.app[GATEWAY]

    def client(self, api_key: str = "no-key-needed") -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=self.base_url, api_key=api_key, max_retries=0)
        self.clients.append(client)
        return client

    def in_flight(self) -> dict[str, int]:
        return {h.name: h.in_flight for h in self.gateway.router.handles}


@asynccontextmanager
async def running_gateway(raw: dict[str, Any]) -> AsyncIterator[RunningGateway]:
    """The app on a free port; its data (the ledger) goes to a fresh temporary directory
    unless ``raw`` names a data_dir."""
    with tempfile.TemporaryDirectory(prefix="spillway-test-") as scratch:
        server = {"data_dir": scratch, **raw.get("server", {})}
        async with _serve(validate({**raw, "server": server})) as running:
            yield running


@asynccontextmanager
async def _serve(config: Config, processes: int = 1) -> AsyncIterator[RunningGateway]:
    """``processes``: as if that many workers shared the port (each enforcing its share)."""
    app = build_app(config, processes=processes)
    # The access log as `spillway serve` writes it with [server] access_log on.
    runner = web.AppRunner(app, handler_cancellation=True, access_log_class=AccessLog)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    running = RunningGateway(f"http://127.0.0.1:{port}/v1", app)
    try:
        yield running
    finally:
        for client in running.clients:
            await client.close()
        await runner.cleanup()


def node(kind: str, base_url: str, **extra: Any) -> dict[str, Any]:
    """A node entry serving the public model 'm' as '<kind>-model'."""
    return {"kind": kind, "base_url": base_url, "models": {"m": f"{kind}-model"}, **extra}
