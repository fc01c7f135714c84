"""``spillway cache stats`` and ``spillway cache clear``: look into and empty the cache.

Both work on the stores the config names (SQLite under the data dir, or Redis and
PostgreSQL), so they see what every running gateway sees, and a clear takes effect at once
for all of them: a semantic match whose answer is gone is a miss.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from spillway.cache.stores import CacheStore, ScopeStats
from spillway.cache.vectors import VectorIndex
from spillway.cli.admin_db import REFUSED_EXIT, actor, admin_db, database_down
from spillway.cli.common import config_option, load_or_exit
from spillway.clock import SystemClock
from spillway.config.schema import Config
from spillway.ledger.sql import SqlLedgerStore, sqlite_url
from spillway.server.cache_setup import make_index, make_store, uses_semantic

_DATA_DIR = click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="The data dir `spillway serve` used (default from the config).",
)


@click.group("cache")
def cache_group() -> None:
    """Inspect or clear the response cache."""


@cache_group.command("stats")
@config_option
@_DATA_DIR
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)
def stats(config_path: Path | None, data_dir: Path | None, fmt: str) -> None:
    """Entries, size and hits per tenant and model; what hits saved (from the ledger)."""
    config = load_or_exit(config_path, {"data_dir": data_dir})
    report = asyncio.run(_gather(config))
    if fmt == "json":
        click.echo(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return
    console = Console() if sys.stdout.isatty() else Console(width=160)
    console.print(_table(report["scopes"]))
    savings = report["savings"]
    console.print(
        f"semantic index: {report['semantic_entries']} entries · ledger: "
        f"{savings['hits']} answers from the cache, {savings['avoided_cost']} "
        f"{savings['currency']} avoided, {savings['reference_cost']} at the reference price"
    )


@cache_group.command("clear")
@config_option
@_DATA_DIR
@click.option("--tenant", default=None, help="Only this tenant's entries.")
@click.option("--model", default=None, help="Only this model's entries.")
def clear(
    config_path: Path | None, data_dir: Path | None, tenant: str | None, model: str | None
) -> None:
    """Delete cached answers (all of them, or one tenant's and/or one model's)."""
    config = load_or_exit(config_path, {"data_dir": data_dir})
    answers, vectors = asyncio.run(_clear(config, tenant, model))
    click.echo(f"cleared {answers} cached answers and {vectors} semantic entries")
    if config.ledger.enabled:
        detail = {"model": model, "answers": answers, "semantic_entries": vectors}
        try:
            asyncio.run(_audit_clear(config, tenant, model, detail))
        except (OSError, SQLAlchemyError) as exc:
            click.echo(f"spillway: the clear is not in the audit trail: {database_down(exc)}",
                       err=True)  # fmt: skip
            sys.exit(REFUSED_EXIT)


async def _gather(config: Config) -> dict[str, Any]:
    async with _opened(config) as (store, index):
        scopes = await store.stats()
        semantic = str(await index.count()) if index is not None else "not configured"
    return {
        "scopes": [_scope_json(s) for s in scopes],
        "semantic_entries": semantic,
        "savings": await _savings(config),
    }


async def _clear(config: Config, tenant: str | None, model: str | None) -> tuple[int, int]:
    async with _opened(config) as (store, index):
        answers = await store.clear(tenant, model)
        vectors = await index.clear(tenant, model) if index is not None else 0
    return answers, vectors


async def _audit_clear(
    config: Config, tenant: str | None, model: str | None, detail: dict[str, Any]
) -> None:
    """The clear, in the audit trail (after it: the cache and the ledger are two stores)."""
    async with admin_db(config, need_keys=False) as db:
        await db.audit.record(actor(), "cache.clear", tenant, model, detail)


@asynccontextmanager
async def _opened(config: Config) -> AsyncIterator[tuple[CacheStore, VectorIndex | None]]:
    """The configured store, and the index when some model is semantic; closed after."""
    clock, data_dir = SystemClock(), config.server.data_dir
    async with AsyncExitStack() as stack:
        store = make_store(config.cache, data_dir, clock)
        await store.open()
        stack.push_async_callback(store.aclose)
        index = None
        if uses_semantic(config):
            index = make_index(config.cache, data_dir, clock)
            await index.open()
            stack.push_async_callback(index.aclose)
        yield store, index


async def _savings(config: Config) -> dict[str, Any]:
    ledger = config.ledger
    result: dict[str, Any] = {
        "hits": 0,
        "avoided_cost": "0",
        "reference_cost": "0",
        "currency": ledger.currency,
    }
    if not ledger.enabled:
        return result
    url = ledger.url.get_secret_value() if ledger.url else sqlite_url(config.server.data_dir)
    store = SqlLedgerStore(url)
    await store.open()
    try:
        hits = [r for r in await store.query() if r.source == "cache"]
    finally:
        await store.aclose()
    result["hits"] = len(hits)
    result["avoided_cost"] = str(sum((r.avoided_cost for r in hits), Decimal(0)))
    result["reference_cost"] = str(sum((r.reference_cost for r in hits), Decimal(0)))
    return result


def _scope_json(scope: ScopeStats) -> dict[str, Any]:
    return {
        "tenant": scope.tenant,
        "model": scope.model,
        "entries": scope.entries,
        "bytes": scope.bytes,
        "hits": scope.hits,
    }


def _table(scopes: list[dict[str, Any]]) -> Table:
    table = Table(title="spillway cache")
    for name in ("tenant", "model", "entries", "bytes", "hits"):
        table.add_column(name, justify="left" if name in ("tenant", "model") else "right")
    for s in scopes:
        table.add_row(
            s["tenant"], s["model"], f"{s['entries']:,}", f"{s['bytes']:,}", f"{s['hits']:,}"
        )
    if not scopes:
        table.add_row("-", "-", "0", "0", "0")
    return table
