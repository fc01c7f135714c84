"""``spillway keys create | list | revoke | rotate``: managed API keys, in the ledger's database.

A new key is printed once and never stored: only its HMAC under the server secret is kept.
Running gateways pick changes up within about a second, on every replica. Each change is in
the audit trail (``spillway audit``), named for the operating-system user who ran it.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
import orjson
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy.exc import SQLAlchemyError

from spillway.access.records import IssuedKey, KeyRequest, explain, parse_duration, unserved_models
from spillway.access.store import KeyStore
from spillway.cli.admin_db import REFUSED_EXIT, actor, admin_db, database_down, fail
from spillway.cli.common import config_option, load_or_exit
from spillway.config.privacy import PII_ACTIONS
from spillway.config.schema import Config
from spillway.errors import SpillwayError

T = TypeVar("T")
_FORMAT = click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True
)


@click.group("keys")
def keys_group() -> None:
    """Issue, list, revoke and rotate managed API keys."""


@keys_group.command("create")
@config_option
@click.option("--tenant", required=True, help="The tenant the key's requests belong to.")
@click.option("--name", default=None, help="A note to recognise the key by (not secret).")
@click.option("--private-only", is_flag=True, help="Its requests never reach a cloud node.")
@click.option("--admin", is_flag=True, help="It may use /admin endpoints.")
@click.option("--budget", default=None, help="A spending limit: 50/month, 300CNY/day.")
@click.option("--rpm", type=int, default=None, help="Requests per minute.")
@click.option("--tpm", type=int, default=None, help="Tokens per minute.")
@click.option("--max-parallel", type=int, default=None, help="Requests in flight at once.")
@click.option("--models", default=None, help="Comma-separated public models it may use.")
@click.option("--pii", type=click.Choice(PII_ACTIONS), default=None,
              help="Its personal-data action, instead of [pii] action.")  # fmt: skip
@click.option("--expires", default=None, help="It stops working after: 30d, 12h, 2w.")
@_FORMAT
def create(config_path: Path | None, fmt: str, **options: Any) -> None:
    """Issue a key; it is printed once and cannot be shown again."""
    config = load_or_exit(config_path)
    models = options.pop("models")
    options["models"] = [m.strip() for m in models.split(",") if m.strip()] if models else None
    options["expires_in"] = options.pop("expires")
    wanted = {k: v for k, v in options.items() if v is not None and v is not False}
    try:
        request = KeyRequest.model_validate(wanted)
    except ValidationError as exc:
        fail(f"invalid key: {explain(exc)}", REFUSED_EXIT)
    unknown = unserved_models(request, config.public_models())
    if unknown:
        fail(f"--models: no node serves {', '.join(unknown)}", REFUSED_EXIT)

    async def issue(store: KeyStore) -> IssuedKey:
        now = datetime.now(UTC)
        return await store.create(
            request.tenant, request.policy, actor(), request.name, request.expires_at(now)
        )

    _show_issued(_run(config, issue), fmt, replaces=None)


@keys_group.command("list")
@config_option
@click.option("--all", "everything", is_flag=True, help="Also revoked and expired keys.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)  # fmt: skip
def list_keys(config_path: Path | None, everything: bool, fmt: str) -> None:
    """Prefix, tenant, limits, created and last used; never the key."""
    config = load_or_exit(config_path)
    keys = _run(config, lambda store: store.keys(include_ended=everything))
    now = datetime.now(UTC)
    shown = [k.public(now) for k in keys]
    if fmt == "json":
        click.echo(orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode())
        return
    console = Console() if sys.stdout.isatty() else Console(width=200)
    console.print(_table(shown))


@keys_group.command("revoke")
@config_option
@click.argument("key_or_prefix")
def revoke(config_path: Path | None, key_or_prefix: str) -> None:
    """Revoke a key, named by its prefix, its key id, or the key itself (- reads it from
    standard input)."""
    config = load_or_exit(config_path)
    named = _named(key_or_prefix)
    key = _run(config, lambda store: store.revoke(named, actor()))
    click.echo(f"revoked {key.prefix}… (tenant {key.tenant}); gateways refuse it within 2 s")


@keys_group.command("rotate")
@config_option
@click.argument("key_or_prefix")
@click.option("--grace", default=None, help="Let the old key work this much longer: 1h, 30m.")
@_FORMAT
def rotate(config_path: Path | None, key_or_prefix: str, grace: str | None, fmt: str) -> None:
    """Issue a replacement with the same tenant, limits and ledger name; revoke the old key
    now, or after --grace."""
    config = load_or_exit(config_path)
    try:
        window = parse_duration(grace) if grace else None
    except ValueError as exc:
        fail(f"--grace: {exc}", REFUSED_EXIT)
    named = _named(key_or_prefix)
    issued, old = _run(config, lambda store: store.rotate(named, actor(), window))
    _show_issued(issued, fmt, replaces=old.prefix)


def _run(config: Config, action: Callable[[KeyStore], Awaitable[T]]) -> T:
    async def run() -> T:
        async with admin_db(config) as db:
            assert db.store is not None  # admin_db exits when keys cannot be managed
            return await action(db.store)

    try:
        return asyncio.run(run())
    except SpillwayError as exc:
        fail(exc.message, REFUSED_EXIT)
    except (OSError, SQLAlchemyError) as exc:
        fail(database_down(exc), REFUSED_EXIT)


def _named(key_or_prefix: str) -> str:
    """``-``: read the key from standard input (a key on the command line stays in the
    shell's history and in ``ps``)."""
    if key_or_prefix != "-":
        return key_or_prefix
    line: str = sys.stdin.readline()
    return line.strip()


def _show_issued(issued: IssuedKey, fmt: str, replaces: str | None) -> None:
    now = datetime.now(UTC)
    record = {"key": issued.key, **issued.record.public(now)}
    if replaces is not None:
        record["replaces"] = replaces
    if fmt == "json":
        click.echo(orjson.dumps(record, option=orjson.OPT_INDENT_2).decode())
        return
    click.echo(issued.key)
    note = f"tenant {issued.record.tenant}, prefix {issued.record.prefix}"
    if replaces is not None:
        note += f", replaces {replaces}"
    click.echo(f"({note}; shown once: store it now)", err=True)


def _table(keys: list[dict[str, Any]]) -> Table:
    table = Table(title="spillway keys")
    for column in ("prefix", "tenant", "name", "state", "limits", "created", "last used"):
        table.add_column(column)
    for k in keys:
        cells = (
            k["prefix"] + "…",
            k["tenant"],
            k["name"] or "",
            k["state"],
            _limits(k),
            (k["created_at"] or "")[:19],
            (k["last_used_at"] or "never")[:19],
        )
        table.add_row(*(Text(cell) for cell in cells))  # text as it is: no markup
    return table


def _limits(key: dict[str, Any]) -> str:
    parts = []
    if key["private_only"]:
        parts.append("private-only")
    if key["admin"]:
        parts.append("admin")
    budget = key.get("budget")
    if budget:
        parts.append(f"{budget['amount']} {budget['currency']}/{budget['period']}")
    for name in ("rpm", "tpm", "max_parallel", "pii"):
        if key.get(name) is not None:
            parts.append(f"{name} {key[name]}")
    if key.get("models") is not None:
        parts.append("models " + ",".join(key["models"]))
    if key.get("expires_at"):
        parts.append(f"until {key['expires_at'][:19]}")
    return "; ".join(parts) or "-"
