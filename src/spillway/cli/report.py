"""``spillway report``: what was spent, what it saved, and who answered, from the ledger."""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime
from pathlib import Path

import click
import orjson
from rich.console import Console
from rich.table import Table
from rich.text import Text

from spillway.cli.common import config_option, load_or_exit, require_charts
from spillway.config.schema import Config
from spillway.ledger.charts import spend_chart
from spillway.ledger.records import LedgerRecord
from spillway.ledger.report import DIMENSIONS, Summary, records_csv, summarize, to_csv
from spillway.ledger.sql import SqlLedgerStore, sqlite_url
from spillway.wire.requests import CONTROL_CHARS


@click.command("report")
@config_option
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="The data dir `spillway serve` used (default from the config).")  # fmt: skip
@click.option("--since", default=None, help="From this date or time (ISO 8601, UTC).")
@click.option("--until", default=None, help="Up to (not including) this date or time.")
@click.option("--by", "by", type=click.Choice(list(DIMENSIONS)), default="model",
              show_default=True)  # fmt: skip
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True)  # fmt: skip
@click.option("--png", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also draw cost over time and the private/cloud/cache split "
                   "(needs the charts extra: matplotlib).")  # fmt: skip
@click.option("--export", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write every record in the window to this CSV file (for finance).")  # fmt: skip
def report(
    config_path: Path | None,
    data_dir: Path | None,
    since: str | None,
    until: str | None,
    by: str,
    fmt: str,
    png: Path | None,
    export: Path | None,
) -> None:
    """Spend, savings against the reference price, private share, cache hit rate, latency."""
    if png is not None:
        require_charts("--png")
    config = load_or_exit(config_path, {"data_dir": data_dir})
    window = (_when(since, "--since"), _when(until, "--until"))
    records = asyncio.run(_read(config, *window))
    rows = summarize(records, by)
    currency = config.ledger.currency
    if fmt == "json":
        click.echo(orjson.dumps([r.as_json() for r in rows], option=orjson.OPT_INDENT_2).decode())
    elif fmt == "csv":
        click.echo(to_csv(rows), nl=False)
    else:
        # Piped into a file, a report should not be cut to a terminal's 80 columns.
        console = Console() if sys.stdout.isatty() else Console(width=200)
        console.print(_table(rows, by, currency, config.ledger.reference))
    if png is not None:
        spend_chart(records, png, currency)
        click.echo(f"chart written to {png}", err=True)
    if export is not None:
        with export.open("w", newline="") as out:
            out.writelines(records_csv(records))
        click.echo(f"{len(records)} records written to {export}", err=True)


async def _read(
    config: Config, since: datetime | None, until: datetime | None
) -> list[LedgerRecord]:
    url = config.ledger.url.get_secret_value() if config.ledger.url else None
    store = SqlLedgerStore(url or sqlite_url(config.server.data_dir))
    await store.open()
    try:
        return await store.query(since, until)
    finally:
        await store.aclose()


def _when(text: str | None, option: str) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        click.echo(f"spillway report: {option} {text!r}: use ISO 8601, e.g. 2026-11-01", err=True)
        sys.exit(2)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _table(rows: list[Summary], by: str, currency: str, reference: str) -> Table:
    table = Table(title=f"spillway ledger by {by} ({currency}; savings against {reference})")
    for column in (
        by,
        "requests",
        "errors",
        "spent",
        "at reference",
        "saved",
        "private",
        "cloud",
        "cache hits",
        "cache saved",
        "p50 ms",
        "p95 ms",
        "TTFT p50",
        "TTFT p95",
    ):
        table.add_column(column, justify="left" if column == by else "right")  # fmt: skip
    for row in rows:
        table.add_row(
            Text(printable(row.group)), str(row.requests), str(row.errors + row.incomplete),
            _money(row.cost), _money(row.reference_cost), _money(row.savings),
            _pct(row.private_share), _pct(row.cloud_share), _pct(row.cache_hit_rate),
            _money(row.cache_avoided), _ms(row.latency_p50_ms), _ms(row.latency_p95_ms),
            _ms(row.ttft_p50_ms), _ms(row.ttft_p95_ms),
            style="bold" if row.group == "total" else None,
        )  # fmt: skip
    return table


def printable(text: str) -> str:
    """``text`` with control characters (escape sequences, line breaks) shown as ``?``: a
    model name is the client's choice, and a terminal would run what it hides."""
    return CONTROL_CHARS.sub("?", text)


def _money(value: object) -> str:
    return f"{value:.4f}"


def _pct(share: float) -> str:
    return f"{100 * share:.1f}%"


def _ms(value: int | None) -> str:
    return "-" if value is None else str(value)
