"""Engine load signals, live: a queueing vLLM node turns hot and ordinary traffic spills;
a node whose metrics are unreadable is still served, ranked by spillway's own counts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from tests.fakes.gateway import node, running_gateway
from tests.fakes.upstream import FakeUpstream, Script
from tests.faults.test_failover import FAST, ask

VLLM_QUEUEING = """# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="private-model"} 12.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="private-model"} 64.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="private-model"} 0.97
"""


@pytest.fixture
async def ups() -> AsyncIterator[dict[str, FakeUpstream]]:
    fakes = {name: await FakeUpstream(name).start() for name in ("gpu", "cloud")}
    yield fakes
    for fake in fakes.values():
        await fake.stop()


def config(ups: dict[str, FakeUpstream]) -> dict[str, object]:
    return {
        "timeouts": FAST,
        "routing": {"signal_interval_s": 0.05},
        "models": {"m": {"spill_wait_s": 0.1}},
        "nodes": {
            "gpu": node("private", ups["gpu"].base_url, load_signal="vllm"),
            "cloud": node("cloud", ups["cloud"].base_url),
        },
    }


async def until(condition, within_s: float = 3.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_queueing_engine_turns_hot_and_traffic_spills_then_returns(ups):
    ups["gpu"].metrics_text = VLLM_QUEUEING
    ups["gpu"].script = Script(latency_s=0.2)  # slow first tokens while its queue is long
    async with running_gateway(config(ups)) as gw:
        handle = gw.gateway.router.handles[0]
        await until(lambda: handle.stats.engine is not None)
        assert handle.stats.engine.waiting == 12 and handle.stats.engine.kv_usage == 0.97
        first = await ask(gw.client(), stream=True)  # measures a 0.2 s TTFT: over 0.1 s
        assert first.node == "gpu"
        await until(lambda: handle.stats.hot)
        assert (await ask(gw.client(), stream=True)).node == "cloud"
        assert (await ask(gw.client(), stream=False)).node == "cloud"
        ups["gpu"].metrics_text = VLLM_QUEUEING.replace("} 12.0", "} 0.0")  # queue drained
        await until(lambda: not handle.stats.hot)
        assert (await ask(gw.client(), stream=False)).node == "gpu"


async def test_unreadable_metrics_never_block_requests(ups):
    ups["gpu"].metrics_text = None  # GET /metrics answers 404
    async with running_gateway(config(ups)) as gw:
        await asyncio.sleep(0.2)  # several failed polls
        handle = gw.gateway.router.handles[0]
        assert handle.stats.engine is None and not handle.stats.hot
        for stream in (False, True):
            assert (await ask(gw.client(), stream=stream)).node == "gpu"
