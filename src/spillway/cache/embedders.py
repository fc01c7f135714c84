"""Turning prompts into vectors: the local all-MiniLM-L6-v2, or any node's /v1/embeddings."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt


class Embedder(Protocol):
    """Embeds texts as L2-normalised float32 rows.

    ``private`` says the texts never leave the private fleet (a local model, or a private
    node): only such an embedder may see ``private_only`` traffic.
    """

    name: str
    private: bool

    async def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        """An (len(texts), dim) array; raises on failure (the caller treats it as a miss)."""
        ...

    async def aclose(self) -> None: ...
