"""``spillway nodes``: the router's view of every node, as a table."""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from typing import Any

import click
import orjson
from rich.console import Console
from rich.table import Table


@click.command("nodes")
@click.option(
    "--url", default="http://127.0.0.1:8000", show_default=True, help="Where the gateway listens."
)
@click.option(
    "--key",
    envvar="SPILLWAY_ADMIN_KEY",
    default=None,
    help="An admin key (or $SPILLWAY_ADMIN_KEY); not needed in open mode on loopback.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def nodes(url: str, key: str | None, as_json: bool) -> None:
    """Show breaker state, load, TTFT and spill share for every node (GET /admin/nodes)."""
    data = _fetch(url.rstrip("/") + "/admin/nodes", key)
    if as_json:
        click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
        return
    console = Console()
    console.print(_nodes_table(data["nodes"]))
    console.print(_models_table(data["models"]))
    for line in _process_problems(data["nodes"]):
        console.print(line, style="red", markup=False, highlight=False)


def _fetch(url: str, key: str | None) -> dict[str, Any]:
    request = urllib.request.Request(url)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            data: dict[str, Any] = orjson.loads(response.read())
            return data
    except urllib.error.HTTPError as exc:
        click.echo(f"spillway nodes: {exc.code}: {_error_message(exc)}", err=True)
    except (urllib.error.URLError, OSError) as exc:
        click.echo(f"spillway nodes: cannot reach {url}: {exc}", err=True)
    sys.exit(1)


def _nodes_table(nodes: list[dict[str, Any]]) -> Table:
    table = Table(title="nodes")
    columns = (
        "node", "kind", "process", "breaker", "in flight", "signal", "age s", "TTFT s", "spill %"
    )  # fmt: skip
    for column in columns:
        table.add_column(column)
    for node in nodes:
        signal = node["signal"]
        shown = "-" if signal is None else f"wait {signal['waiting']:g} run {signal['running']:g}"
        table.add_row(
            node["name"],
            node["kind"],
            "-" if node.get("managed") is None else node["managed"]["process"],
            node["breaker"] + (" (hot)" if node["hot"] else ""),
            f"{node['in_flight']}/{node['max_concurrency']}",
            shown,
            _num(node["signal_age_s"]),
            _num(node["ttft_avg_s"]),
            f"{100 * node['spill_share']:.1f}",
        )
    return table


def _process_problems(nodes: list[dict[str, Any]]) -> list[str]:
    """A line per managed node that is not serving: why, and when it is tried again."""
    lines = []
    for node in nodes:
        managed = node.get("managed")
        if managed is None or managed["process"] == "running":
            continue
        line = f"{node['name']}: {managed['process']}"
        if "reason" in managed:
            line += f": {managed['reason']}"
        if "next_start_in_s" in managed:
            line += f" (next start in {managed['next_start_in_s']:g} s)"
        lines.append(line)
    return lines


def _models_table(models: dict[str, Any]) -> Table:
    table = Table(title="models")
    for column in ("model", "requests", "spilled", "spill %", "waiting"):
        table.add_column(column)
    for name, m in models.items():
        share = f"{100 * m['spill_share']:.1f}"
        table.add_row(name, str(m["requests"]), str(m["spilled"]), share, str(m["waiting"]))
    return table


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        message = orjson.loads(exc.read())["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return str(exc.reason)  # not our envelope: a proxy in between, say
    return str(message)
