"""Embeddings from any node's ``/v1/embeddings`` (a private embedding node in production)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import orjson

from spillway.config.schema import Timeouts
from spillway.nodes.base import Node


class NodeEmbedder:
    """Asks one configured node for embeddings. ``private`` is the node's kind: a cloud
    embedder never sees ``private_only`` prompts (the cache checks before calling)."""

    def __init__(self, node: Node, model: str, private: bool, timeouts: Timeouts):
        self.name = f"node:{node.name}"
        self.private = private
        self._node = node
        self._model = model
        self._timeouts = timeouts

    async def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        body = orjson.dumps({"model": self._model, "input": texts})
        reply = await self._node.embed(body, self._timeouts)
        return _rows(orjson.loads(reply.body), len(texts))

    async def aclose(self) -> None:
        """The node's session belongs to its handle, which closes it."""


def _rows(payload: object, expected: int) -> npt.NDArray[np.float32]:
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list) or len(data) != expected:
        raise ValueError("the embedding node answered without one embedding per input")
    ordered = sorted(data, key=lambda item: int(item.get("index", 0)))
    matrix = np.asarray([item["embedding"] for item in ordered], dtype=np.float32)
    if matrix.ndim != 2 or not np.isfinite(matrix).all():
        raise ValueError("the embedding node answered with malformed vectors")
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    normalised: npt.NDArray[np.float32] = matrix / np.maximum(norms, 1e-12)
    return normalised
