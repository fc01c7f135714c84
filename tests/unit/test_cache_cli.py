"""``spillway cache stats`` and ``spillway cache clear`` on the embedded stores (SQLite),
through click's test runner; the shared stores are covered in tests/e2e/test_cache_shared.py."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import orjson
from click.testing import CliRunner, Result

from spillway.cache.sqlite_store import SqliteCacheStore
from spillway.cache.stores import Entry
from spillway.cli.main import cli
from spillway.clock import SystemClock
from spillway.ledger.sql import SqlLedgerStore, sqlite_url
from tests.unit.test_ledger_store import make_record


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "spillway.toml"
    path.write_text(
        f"""
[server]
data_dir = "{tmp_path / "data"}"

[nodes.n]
kind = "cloud"
base_url = "http://127.0.0.1:9/v1"
models = {{ "m" = "m" }}
"""
    )
    return path


async def seed(data_dir: Path) -> None:
    clock = SystemClock()
    store = SqliteCacheStore(data_dir / "cache.db", clock, max_entries=100, max_bytes=1 << 20)
    await store.open()
    for i, (tenant, model) in enumerate([("a", "m"), ("a", "m"), ("b", "m"), ("b", "x")]):
        await store.set(Entry(f"k{i}", tenant, model, b"v" * 10, clock.wall() + 60))
    assert await store.get("k0") is not None  # one hit
    await store.aclose()
    ledger = SqlLedgerStore(sqlite_url(data_dir))
    await ledger.open()
    hit = make_record(
        1,
        at=datetime.now(UTC),
        source="cache",
        node=None,
        cost=Decimal(0),
        avoided_cost=Decimal("0.002"),
    )
    await ledger.write([hit, make_record(2, at=datetime.now(UTC))])
    await ledger.aclose()


def run(config: Path, *args: str) -> Result:
    result = CliRunner().invoke(
        cli, ["cache", *args, "--config", str(config)], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    return result


def test_stats_then_clear_by_tenant_and_model(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    asyncio.run(seed(tmp_path / "data"))
    stats = orjson.loads(run(config, "stats", "--format", "json").stdout)
    scopes = {(s["tenant"], s["model"]): (s["entries"], s["hits"]) for s in stats["scopes"]}
    assert scopes == {("a", "m"): (2, 1), ("b", "m"): (1, 0), ("b", "x"): (1, 0)}
    assert stats["savings"]["hits"] == 1
    assert Decimal(stats["savings"]["avoided_cost"]) == Decimal("0.002")
    assert stats["semantic_entries"] == "not configured"
    assert "a" in run(config, "stats").stdout  # the table
    assert run(config, "clear", "--tenant", "b", "--model", "x").stdout.startswith(
        "cleared 1 cached answers"
    )
    assert run(config, "clear", "--tenant", "a").stdout.startswith("cleared 2 cached answers")
    left = orjson.loads(run(config, "stats", "--format", "json").stdout)["scopes"]
    assert [(s["tenant"], s["model"]) for s in left] == [("b", "m")]
    assert run(config, "clear").stdout.startswith("cleared 1 cached answers")
