"""Fixtures shared by the fault tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.fakes.upstream import FakeUpstream


@pytest.fixture
async def ups() -> AsyncIterator[dict[str, FakeUpstream]]:
    """A fake LLM node ("llm") and a fake embedder ("emb"), as the cache fault tests use them.
    Modules that need other nodes define their own ``ups``, which takes precedence."""
    fakes = {name: await FakeUpstream(name).start() for name in ("llm", "emb")}
    yield fakes
    for fake in fakes.values():
        await fake.stop()
