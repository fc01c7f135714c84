"""What the ledger adds to one request: the synchronous part on the request path (open the
tally, cost it, hand the record to the write-behind queue) and the background write rate.

Run: .venv/bin/python bench/ledger_overhead.py [--requests N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from spillway.clock import SystemClock
from spillway.config.schema import Timeouts
from spillway.ledger.budgets import Budgets
from spillway.ledger.costing import Costing
from spillway.ledger.sql import SqlLedgerStore, sqlite_url
from spillway.ledger.writer import LedgerWriter
from spillway.nodes.tokens import EstimatingCounter
from spillway.pipeline.accounting import Accountant
from spillway.pipeline.principal import Principal
from spillway.prices import LIST_PRICES, Exchange
from spillway.routing.router import NodeHandle
from spillway.wire.streams import Usage


def build(writer: LedgerWriter | None) -> tuple[Accountant, NodeHandle]:
    clock = SystemClock()
    dummy: Any = object()
    handle = NodeHandle(
        name="cloud", kind="cloud", node=dummy, models={"m": "m-up"}, max_concurrency=64,
        weight=1.0, timeouts=Timeouts(), counter=EstimatingCounter(),
    )  # fmt: skip
    prices = {"cloud": LIST_PRICES["deepseek-v3.2"]}
    exchange = Exchange()
    costing = Costing(prices, {}, LIST_PRICES["gpt-4.1"], exchange, "USD", clock)
    budgets = Budgets({}, exchange, "USD", clock)
    return Accountant(costing, budgets, writer, clock, 4096), handle


def hot_path_ns(
    accountant: Accountant, handle: NodeHandle, requests: int, prefix: str
) -> list[int]:
    principal = Principal("tenant", False, key_id="0123456789abcdef")
    samples = []
    for i in range(requests):
        started = time.perf_counter_ns()
        tally = accountant.open(f"{prefix}-{i}", principal)
        tally.asked_for("m")
        tally.answered_by(handle, "m")
        tally.used(Usage(120, 80))
        accountant.close(tally)
        samples.append(time.perf_counter_ns() - started)
    return samples


async def main(requests: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        store = SqlLedgerStore(sqlite_url(Path(scratch)))
        await store.open()
        writer = LedgerWriter(store, SystemClock(), flush_interval_s=0.5)
        writer.start()
        accountant, handle = build(writer)
        hot_path_ns(accountant, handle, 2000, "warm")  # warm-up
        samples = hot_path_ns(accountant, handle, requests, "run")
        started = time.perf_counter()
        await writer.aclose()
        drained = time.perf_counter() - started
        rows = len(await store.query())
        await store.aclose()
    bare, bare_handle = build(None)
    baseline = hot_path_ns(bare, bare_handle, requests, "bare")
    q = statistics.quantiles
    print(f"ledger on : p50 {q(samples, n=100)[49] / 1000:.1f} us, "
          f"p99 {q(samples, n=100)[98] / 1000:.1f} us per request on the request path")  # fmt: skip
    print(f"ledger off: p50 {q(baseline, n=100)[49] / 1000:.1f} us (costing and budgets only)")
    print(f"background: all {rows} rows in SQLite; what was pending at shutdown was flushed "
          f"in {drained:.2f} s")  # fmt: skip
    assert rows == requests + 2000, "every record must reach the store"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20000)
    asyncio.run(main(parser.parse_args().requests))
