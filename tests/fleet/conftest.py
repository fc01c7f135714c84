"""A fleet of scripted nodes (3 private, 1 cloud) behind an in-process gateway, a load
generator, and a table of the measured figures printed at the end of the test run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from tests.fakes.gateway import RunningGateway, node, running_gateway
from tests.fakes.upstream import FakeUpstream

OPEN_KEY = "fleet-open-key"
SOVEREIGN_KEY = "fleet-private-only-key"
ADMIN_KEY = "fleet-admin-key"
PRIVATE = ("p1", "p2", "p3")
PER_NODE = 4  # max_concurrency of each private node: 12 in all

FIGURES: list[tuple[str, str, str]] = []


def record(scenario: str, variant: str, figure: str) -> None:
    FIGURES.append((scenario, variant, figure))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    terminalreporter.section("fleet figures (measured in this run)")
    for scenario, variant, figure in FIGURES:
        terminalreporter.write_line(f"{scenario:<34} {variant:<22} {figure}")


def fleet_config(ups: dict[str, FakeUpstream], **overrides: Any) -> dict[str, Any]:
    nodes = {
        name: node("private", ups[name].base_url, max_concurrency=PER_NODE) for name in PRIVATE
    }
    nodes["cloud"] = node("cloud", ups["cloud"].base_url, api_key="sk-fleet-cloud-0123456789")
    config: dict[str, Any] = {
        "timeouts": {"connect_s": 0.5, "first_token_s": 0.5, "idle_s": 1.0, "total_s": 2.0,
                     "deadline_s": 5.0},
        "breaker": {"open_base_s": 1.0, "open_max_s": 4.0, "probe_interval_s": 0.2},
        "routing": {"queue_size": 512},
        "nodes": nodes,
        "keys": [
            {"key": OPEN_KEY, "tenant": "apps"},
            {"key": SOVEREIGN_KEY, "tenant": "gov", "private_only": True},
            {"key": ADMIN_KEY, "tenant": "ops", "admin": True},
        ],
    }  # fmt: skip
    config.update(overrides)
    return config


@pytest.fixture
async def ups() -> AsyncIterator[dict[str, FakeUpstream]]:
    fakes = {name: await FakeUpstream(name).start() for name in (*PRIVATE, "cloud")}
    yield fakes
    for fake in fakes.values():
        await fake.stop()


@pytest.fixture
async def fleet(ups: dict[str, FakeUpstream]) -> AsyncIterator[RunningGateway]:
    async with running_gateway(fleet_config(ups)) as gateway:
        yield gateway


@dataclass(frozen=True)
class Outcome:
    status: int
    node: str | None
    latency_s: float
    complete: bool  # 200, and a stream that ended with [DONE]
    error: str = ""  # the error's message, for a failure


async def call(
    session: aiohttp.ClientSession, gw: RunningGateway, key: str, stream: bool
) -> Outcome:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    headers = {"Authorization": f"Bearer {key}"}
    started = time.monotonic()
    async with session.post(gw.base_url + "/chat/completions", json=body, headers=headers) as r:
        data = await r.read()
        node_name = r.headers.get("x-spillway-node")
    latency = time.monotonic() - started
    complete = r.status == 200 and (not stream or data.endswith(b"data: [DONE]\n\n"))
    error = "" if complete else data[-300:].decode("utf-8", "replace")
    return Outcome(r.status, node_name, latency, complete, error)


async def load(
    gw: RunningGateway,
    requests: int,
    concurrency: int,
    key: str,
    stream: bool,
    outcomes: list[Outcome] | None = None,
) -> list[Outcome]:
    """``requests`` calls from ``concurrency`` workers; ``outcomes`` fills as they finish."""
    done: list[Outcome] = [] if outcomes is None else outcomes
    remaining = iter(range(requests))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for _ in remaining:
                done.append(await call(session, gw, key, stream))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
