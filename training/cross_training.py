"""Training the cross-encoder (``spillway.cache.cross_encoder``) with torch:
``training.train_cross_encoder`` and the tests use this; the gateway never imports it (it runs
the shipped model on onnxruntime).

What is trained is small: a low-rank (LoRA) update of every linear layer of the shipped
all-MiniLM-L6-v2, its layer norms, its segment embeddings and a one-unit head over the
mean-pooled last layer. ``adapter_arrays`` is what ships in ``cross_encoder.npz``; the word
and position tables stay frozen, so the gateway shares them with the embedder.

torch and transformers (the ``train`` extra) are imported by whoever imports this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from spillway.cache.cross_encoder import fold
from spillway.cache.minilm import model_dir

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
    """Fold shipped arrays into a plain (unwrapped) ``PairModel``, as the gateway does
    (``cross_encoder.fold``): the torch twin of the shipped model, for checks."""
    params = dict(model.bert.named_parameters())
    base = {name: param.detach().numpy() for name, param in params.items()}
    params |= {f"head.{k}": v for k, v in model.head.named_parameters()}
    with torch.no_grad():
        for name, value in fold(base, arrays).items():
            params[name].copy_(torch.from_numpy(value).reshape(params[name].shape))


def load_base() -> tuple[Any, PairModel]:
    """The tokenizer and an untrained ``PairModel`` on the shipped all-MiniLM-L6-v2."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # quiet log
    path = str(model_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    # float32 whatever the file holds (transformers 5 would keep a float16 file's dtype);
    # .float() rather than from_pretrained's dtype=, which transformers before 4.56 ignores
    return tokenizer, PairModel(AutoModel.from_pretrained(path)).float()


def encode(tokenizer: Any, firsts: Sequence[str], seconds: Sequence[str], max_tokens: int) -> Batch:
    """Tokenise pairs as ``[CLS] a [SEP] b [SEP]``, padded, truncated to ``max_tokens``."""
    enc = tokenizer(
        list(firsts), list(seconds), padding=True, truncation="longest_first",
        max_length=max_tokens, return_tensors="pt",
    )  # fmt: skip
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
