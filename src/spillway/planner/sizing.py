"""Does a model fit on an accelerator? Weights plus KV cache against usable memory.

Every quantity is a whole number of bytes::

    weights  = params x bytes per parameter x (1 + WEIGHT_OVERHEAD)
    kv cache = 2 (K and V) x layers x kv_heads x head_dim x kv bytes x context x concurrency
    usable   = memory per card x cards x memory utilisation

The answer to "CUDA out of memory loading a 32B model" is a verdict, the lightest quantization
(the least precision given up) that fits, and the largest concurrency that fits. Why each
constant has its value is in docs/planner.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

from spillway.planner.profiles import Accelerator, ModelProfile

GIB = 2**30
#: Bytes per weight, heaviest first: the order in which quantizations are tried.
QUANTIZATIONS: Mapping[str, Decimal] = {
    "fp16": Decimal(2),
    "bf16": Decimal(2),
    "int8": Decimal(1),
    "int4": Decimal("0.5"),
}
#: Bytes per cached K or V element. Engines keep the KV cache in the activation dtype (16-bit)
#: unless told otherwise, whatever the weight quantization.
KV_DTYPES: Mapping[str, int] = {"fp16": 2, "bf16": 2, "fp8": 1, "int8": 1}
#: On top of the raw weights: quantization scales and zero points, layers left unquantized
#: (embeddings, output head), and the engine's activation workspace.
WEIGHT_OVERHEAD = Decimal("0.10")
#: Share of each card's memory the engine may use (vLLM's ``--gpu-memory-utilization`` default);
#: the rest is the runtime's context, the allocator's fragmentation and headroom.
DEFAULT_MEMORY_UTILISATION = Decimal("0.90")


@dataclass(frozen=True, slots=True)
class Deployment:
    """What is asked: a model, its quantization, the traffic shape, and the cards."""

    model: ModelProfile
    accelerator: Accelerator
    count: int = 1
    quantization: str = "bf16"
    context: int = 8192
    concurrency: int = 1
    kv_dtype: str = "bf16"
    memory_utilisation: Decimal = DEFAULT_MEMORY_UTILISATION

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {self.quantization!r}")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"unknown KV cache dtype {self.kv_dtype!r}")
        if min(self.count, self.context, self.concurrency) < 1:
            raise ValueError("cards, context and concurrency must each be at least 1")
        if not Decimal(0) < self.memory_utilisation <= Decimal(1):
            raise ValueError("memory utilisation must be above 0 and at most 1")


def weight_bytes(params: int, quantization: str) -> int:
    raw = Decimal(params) * QUANTIZATIONS[quantization] * (1 + WEIGHT_OVERHEAD)
    return int(raw.to_integral_value(rounding=ROUND_CEILING))


def kv_bytes_per_token(model: ModelProfile, kv_dtype: str) -> int | None:
    """K and V for one token across all layers; ``None`` when the model's shape is unknown."""
    if model.layers is None or model.kv_heads is None or model.head_dim is None:
        return None
    return 2 * model.layers * model.kv_heads * model.head_dim * KV_DTYPES[kv_dtype]


def usable_bytes(accelerator: Accelerator, count: int, utilisation: Decimal) -> int:
    raw = accelerator.memory_gib * GIB * count * utilisation
    return int(raw.to_integral_value(rounding=ROUND_FLOOR))


@dataclass(frozen=True, slots=True)
class Fit:
    """One quantization of the deployment: what it needs and whether it fits."""

    quantization: str
    weights: int
    kv_cache: int | None
    usable: int
    #: the most sequences of ``context`` tokens that fit next to the weights; None: unknown
    max_concurrency: int | None
    #: how many of these cards the deployment needs at this quantization
    cards_needed: int

    @property
    def required(self) -> int:
        return self.weights + (self.kv_cache or 0)

    @property
    def fits(self) -> bool:
        return self.required <= self.usable


def fit(deployment: Deployment, quantization: str) -> Fit:
    d = deployment
    weights = weight_bytes(d.model.params, quantization)
    per_token = kv_bytes_per_token(d.model, d.kv_dtype)
    usable = usable_bytes(d.accelerator, d.count, d.memory_utilisation)
    kv_cache = None if per_token is None else per_token * d.context * d.concurrency
    max_concurrency = None
    if per_token is not None:
        max_concurrency = max(0, usable - weights) // (per_token * d.context)
    per_card = usable_bytes(d.accelerator, 1, d.memory_utilisation)
    required = weights + (kv_cache or 0)
    cards = max(1, -(-required // per_card)) if per_card > 0 else 0
    return Fit(quantization, weights, kv_cache, usable, max_concurrency, cards)


@dataclass(frozen=True, slots=True)
class SizingReport:
    """The verdict for the asked quantization, and the same check at every quantization."""

    deployment: Deployment
    asked: Fit
    by_quantization: tuple[Fit, ...]

    @property
    def lightest_fitting(self) -> str | None:
        """The heaviest (most precise) quantization that fits, e.g. int8 before int4."""
        return next((f.quantization for f in self.by_quantization if f.fits), None)

    @property
    def verdict(self) -> str:
        d, asked = self.deployment, self.asked
        cards = f"{d.count} x {d.accelerator.name}"
        shape = f"{d.context:,}-token context x {d.concurrency}"
        need = f"needs {gib(asked.required)} GiB"
        if asked.kv_cache is None:
            need += " for the weights alone (KV cache not counted: the model's shape is unknown)"
        head = f"{d.model.name} at {asked.quantization} with {shape} {need}; "
        head += f"{cards} offers {gib(asked.usable)} GiB usable."
        if asked.fits:
            return f"Fits. {head}"
        advice = []
        lightest = self.lightest_fitting
        if lightest is not None and lightest != asked.quantization:
            advice.append(f"use {lightest}")
        advice.append(f"use {asked.cards_needed} cards at {asked.quantization}")
        if asked.kv_cache:
            advice.append("shorten the context or lower the concurrency")
        return f"Does not fit. {head} To fix: {'; or '.join(advice)}."


def size(deployment: Deployment) -> SizingReport:
    """Check the deployment at its quantization and at every other one (heaviest first)."""
    seen: dict[Decimal, Fit] = {}
    for name, width in QUANTIZATIONS.items():
        if width not in seen and name != "fp16":  # fp16 and bf16 weigh the same
            seen[width] = fit(deployment, name)
    by_quantization = tuple(seen.values())
    return SizingReport(deployment, fit(deployment, deployment.quantization), by_quantization)


def gib(size_bytes: int) -> str:
    """Bytes as GiB with one decimal: ``74.6``."""
    return f"{Decimal(size_bytes) / GIB:.1f}"


def _fit_data(f: Fit) -> dict[str, object]:
    return {
        "quantization": f.quantization,
        "weights_bytes": f.weights,
        "kv_cache_bytes": f.kv_cache,
        "required_bytes": f.required,
        "usable_bytes": f.usable,
        "fits": f.fits,
        "max_concurrency": f.max_concurrency,
        "cards_needed": f.cards_needed,
    }


def report_data(report: SizingReport) -> dict[str, object]:
    """The report as plain data for JSON; sizes in bytes."""
    d = report.deployment
    m, acc = d.model, d.accelerator
    return {
        "model": {
            "key": m.key,
            "name": m.name,
            "params": m.params,
            "layers": m.layers,
            "kv_heads": m.kv_heads,
            "head_dim": m.head_dim,
        },
        "accelerator": {
            "key": acc.key,
            "name": acc.name,
            "memory_gib": acc.memory_gib,
            "source": acc.source,
        },
        "count": d.count,
        "context": d.context,
        "concurrency": d.concurrency,
        "kv_dtype": d.kv_dtype,
        "memory_utilisation": d.memory_utilisation,
        "verdict": report.verdict,
        **_fit_data(report.asked),
        "lightest_fitting_quantization": report.lightest_fitting,
        "by_quantization": [_fit_data(f) for f in report.by_quantization],
    }
