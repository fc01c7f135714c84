"""What ``spillway keys``, ``spillway audit`` and ``cache clear`` share: the ledger's database
as the config names it, opened for one command, and who the command is acting for."""

from __future__ import annotations

import os
import pwd
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import NoReturn

import click

from spillway.access.audit import AuditTrail
from spillway.access.store import KeyStore
from spillway.access.tokens import hasher_for
from spillway.clock import SystemClock
from spillway.config.schema import Config
from spillway.errors import SpillwayError
from spillway.ledger.sql import SqlLedgerStore, sqlite_url

#: the database is off or unusable for this: like a bad configuration, nothing has run
NO_DATABASE_EXIT = 2
#: the command was refused (no such key, a bad value)
REFUSED_EXIT = 1


@dataclass(frozen=True, slots=True)
class AdminDb:
    store: KeyStore | None  # None: no secret for a shared database (audit still works)
    audit: AuditTrail


def actor() -> str:
    """Who the audit trail names for a CLI command: the operating-system user the process
    runs as (not $USER, which anyone may set)."""
    try:
        return f"cli:{pwd.getpwuid(os.getuid()).pw_name}"
    except KeyError:
        return f"cli:uid-{os.getuid()}"


def database_down(exc: BaseException) -> str:
    """One line for a database that did not answer (the URL may hold a password: not shown)."""
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"the ledger's database did not answer ({type(exc).__name__}: {first})"


@asynccontextmanager
async def admin_db(config: Config, need_keys: bool = True) -> AsyncIterator[AdminDb]:
    if not config.ledger.enabled:
        fail("keys and the audit trail live in the ledger's database: [ledger] enabled = false")
    ledger = config.ledger
    url = ledger.url.get_secret_value() if ledger.url else sqlite_url(config.server.data_dir)
    clock = SystemClock()
    database = SqlLedgerStore(url, clock)
    try:
        store = None
        try:
            store = KeyStore(database, hasher_for(config), clock)
        except SpillwayError as exc:
            if need_keys:
                fail(exc.message)
        yield AdminDb(store, AuditTrail(database, clock))
    finally:
        await database.aclose()


def fail(message: str, code: int = NO_DATABASE_EXIT) -> NoReturn:
    click.echo(f"spillway: {message}", err=True)
    sys.exit(code)
