"""``spillway serve`` tunes the garbage collector once start-up is over."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from aiohttp import web

from spillway.cli.serve import YOUNG_GC_THRESHOLD, _freeze_startup_objects


@pytest.fixture
def restored_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)
    gc.unfreeze()


async def test_startup_objects_are_frozen_and_young_collections_rarer(restored_gc: None) -> None:
    older = gc.get_threshold()[1:]
    await _freeze_startup_objects(web.Application())
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (YOUNG_GC_THRESHOLD, *older)
