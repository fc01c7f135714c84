"""``spillway audit``: admin actions and personal-data decisions, newest first.

Admin actions (key create, revoke, rotate; cache clear) come from the ``audit`` table;
personal-data decisions from the ledger rows of the requests they were made for (the
kinds and counts found, never a value).
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy.exc import SQLAlchemyError

from spillway.access.audit import AuditEvent, EventKind
from spillway.access.records import parse_duration
from spillway.cli.admin_db import REFUSED_EXIT, admin_db, database_down, fail
from spillway.cli.common import config_option, load_or_exit
from spillway.config.schema import Config

_KINDS: dict[str, frozenset[EventKind]] = {
    "all": frozenset({"admin", "pii"}),
    "admin": frozenset({"admin"}),
    "pii": frozenset({"pii"}),
}


@click.command("audit")
@config_option
@click.option("--since", default=None, help="Only the last 7d, 24h, …")
@click.option("--kind", type=click.Choice(list(_KINDS)), default="all", show_default=True)
@click.option("--tenant", default=None, help="Only this tenant's events.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=200, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)  # fmt: skip
def audit(
    config_path: Path | None,
    since: str | None,
    kind: str,
    tenant: str | None,
    limit: int,
    fmt: str,
) -> None:
    """Who issued, revoked or rotated keys and cleared the cache; what personal data was
    found in which request, and what was done with it."""
    config = load_or_exit(config_path)
    try:
        window = parse_duration(since) if since else None
    except ValueError as exc:
        fail(f"--since: {exc}", REFUSED_EXIT)
    try:
        events = asyncio.run(_events(config, window, _KINDS[kind], tenant, limit))
    except (OSError, SQLAlchemyError) as exc:
        fail(database_down(exc), REFUSED_EXIT)
    if fmt == "json":
        shown = [e.public() for e in events]
        click.echo(orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode())
        return
    console = Console() if sys.stdout.isatty() else Console(width=200)
    console.print(_table(events))


async def _events(
    config: Config,
    window: timedelta | None,
    kinds: frozenset[EventKind],
    tenant: str | None,
    limit: int,
) -> list[AuditEvent]:
    since = datetime.now(UTC) - window if window is not None else None
    async with admin_db(config, need_keys=False) as db:
        return await db.audit.events(since, kinds, tenant, limit)


def _table(events: list[AuditEvent]) -> Table:
    table = Table(title="spillway audit")
    for column in ("at (UTC)", "action", "actor", "tenant", "target", "detail"):
        table.add_column(column)
    for e in events:
        detail = ", ".join(f"{k}={_plain(v)}" for k, v in e.detail.items())
        cells = (
            e.at.strftime("%Y-%m-%d %H:%M:%S"),
            e.action,
            e.actor,
            e.tenant or "",
            e.target or "",
            detail,
        )
        table.add_row(*(Text(cell) for cell in cells))  # text as it is: no markup
    return table


def _plain(value: Any) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}:{v}" for k, v in value.items())
    return str(value)
