"""The editable numbers behind ``spillway roi`` and ``spillway plan``.

Three tables, each keyed by a short name:

- ``HARDWARE``: private inference boxes (price, throughput, power draw, running cost) for roi;
- ``ACCELERATORS``: accelerator cards and their memory, for plan;
- ``MODELS``: model architectures (parameters, layers, KV heads, head size), for plan.

Every default and where it comes from is listed in docs/planner.md. A TOML file given with
``--profiles`` adds entries or replaces them by key (``[hardware.NAME]``,
``[accelerators.NAME]``, ``[models.NAME]``); :func:`load_book` reads it.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from spillway.errors import ConfigError
from spillway.prices import Currency


@dataclass(frozen=True, slots=True)
class HardwareProfile:
    """One private inference box: what it costs, draws and serves.

    ``tokens_per_second`` is the sustained aggregate generation (decode) throughput of the whole
    box; ``price`` is paid up front; ``power_kw`` is the average wall draw while serving;
    ``ops_per_month`` covers rack space, maintenance and operator time. Money is in ``currency``.
    """

    key: str
    name: str
    accelerator: str
    accelerator_count: int
    ram_gb: int
    tokens_per_second: Decimal
    price: Decimal
    power_kw: Decimal
    ops_per_month: Decimal
    currency: Currency = "CNY"

    @property
    def summary(self) -> str:
        return f"{self.accelerator_count}x {self.accelerator}, {self.ram_gb} GB RAM"


@dataclass(frozen=True, slots=True)
class Accelerator:
    """An accelerator card: its memory (GiB, as the vendor rounds it) and where that is from."""

    key: str
    name: str
    memory_gib: Decimal
    tdp_w: int | None = None
    #: "vendor" (published by the maker) or "reported" (press, benchmarks, maintainers)
    source: str = "reported"


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """The architecture numbers that decide a model's memory: weights and KV cache."""

    key: str
    name: str
    params: int
    layers: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None

    @property
    def has_kv_shape(self) -> bool:
        return None not in (self.layers, self.kv_heads, self.head_dim)

    def overridden(
        self,
        params: int | None = None,
        layers: int | None = None,
        kv_heads: int | None = None,
        head_dim: int | None = None,
    ) -> ModelProfile:
        """This model with the given numbers replaced (``None`` keeps the model's own)."""
        return ModelProfile(
            self.key,
            self.name,
            self.params if params is None else params,
            self.layers if layers is None else layers,
            self.kv_heads if kv_heads is None else kv_heads,
            self.head_dim if head_dim is None else head_dim,
        )


#: The three boxes of the issue. Throughput and price are the issue's figures; power draw and
#: running cost are documented assumptions (docs/planner.md, "Hardware profiles").
_HARDWARE_ROWS = (
    # key, name, accelerator, count, RAM GB, tok/s, price CNY, kW, ops CNY/month
    ("development", "Development", "ascend-910b", 1, 256, 30, 50_000, "0.8", 2_000),
    ("production-small", "Production Small", "ascend-910b", 4, 1024, 120, 200_000, "2.2", 8_000),
    ("production-large", "Production Large", "ascend-910c", 8, 2048, 350, 800_000, "7.0", 20_000),
)
HARDWARE: dict[str, HardwareProfile] = {
    row[0]: HardwareProfile(
        row[0],
        row[1],
        row[2],
        row[3],
        row[4],
        Decimal(row[5]),
        Decimal(row[6]),
        Decimal(row[7]),
        Decimal(row[8]),
    )
    for row in _HARDWARE_ROWS
}


def _acc(key: str, name: str, gib: int, tdp: int | None, source: str) -> Accelerator:
    return Accelerator(key, name, Decimal(gib), tdp, source)


#: Memory per card. Sources, and which figures are vendor-published: docs/planner.md.
ACCELERATORS: dict[str, Accelerator] = {
    a.key: a
    for a in (
        _acc("ascend-910b", "Huawei Ascend 910B (B1-B3)", 64, 400, "reported"),
        _acc("ascend-910b4", "Huawei Ascend 910B4", 32, None, "reported"),
        _acc("ascend-910c", "Huawei Ascend 910C", 128, None, "reported"),
        _acc("mtt-s4000", "Moore Threads MTT S4000", 48, None, "reported"),
        _acc("mlu370-x8", "Cambricon MLU370-X8", 48, 250, "reported"),
        _acc("mlu590", "Cambricon MLU590", 80, None, "reported"),
        _acc("h100-80gb", "NVIDIA H100 SXM 80GB", 80, 700, "vendor"),
        _acc("h100-nvl", "NVIDIA H100 NVL", 94, 400, "vendor"),
        _acc("h200", "NVIDIA H200 141GB", 141, 700, "vendor"),
        _acc("h20", "NVIDIA H20", 96, 400, "reported"),
        _acc("a100-40gb", "NVIDIA A100 40GB", 40, 400, "vendor"),
        _acc("a100-80gb", "NVIDIA A100 80GB", 80, 400, "vendor"),
        _acc("l40s", "NVIDIA L40S", 48, 350, "vendor"),
        _acc("l20", "NVIDIA L20", 48, None, "reported"),
        _acc("rtx-4090", "NVIDIA GeForce RTX 4090", 24, 450, "vendor"),
        _acc("rtx-3090", "NVIDIA GeForce RTX 3090", 24, 350, "vendor"),
    )
}

#: Architectures from each model's public config.json; parameter counts are computed from the
#: same configs (docs/planner.md, "Model profiles").
MODELS: dict[str, ModelProfile] = {
    m.key: m
    for m in (
        ModelProfile("glm-4-9b", "GLM-4-9B", 9_399_951_360, 40, 2, 128),
        ModelProfile("glm-4-32b", "GLM-4-32B-0414", 32_566_081_536, 61, 2, 128),
        ModelProfile("qwen2.5-32b", "Qwen2.5-32B", 32_763_876_352, 64, 8, 128),
        ModelProfile("llama-3-70b", "Llama-3-70B", 70_553_706_496, 80, 8, 128),
    )
}


@dataclass(frozen=True, slots=True)
class ProfileBook:
    """The three tables together: the built-in ones, plus whatever a ``--profiles`` file adds."""

    hardware: Mapping[str, HardwareProfile] = field(default_factory=lambda: dict(HARDWARE))
    accelerators: Mapping[str, Accelerator] = field(default_factory=lambda: dict(ACCELERATORS))
    models: Mapping[str, ModelProfile] = field(default_factory=lambda: dict(MODELS))


#: Suffix → power of 1,000 (or of 1,024 for binary counts).
_SUFFIXES = {"": 0, "k": 1, "m": 2, "b": 3, "g": 3, "t": 4}
_COUNT = re.compile(r"^\s*([0-9][0-9_,]*(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)\s*([kmbgt]?)\s*$", re.I)


def parse_count(text: str | int, *, binary: bool = False) -> int:
    """``"32B"``, ``"32e9"``, ``"10M"``, ``"32k"``, ``"1,000"`` or ``32`` → a whole count.

    Suffixes are decimal (k = 1,000; M = 10^6; B or G = 10^9; T = 10^12), or powers of 1,024
    with ``binary=True``, as context lengths are written (32k = 32,768). A value that is not a
    whole number once the suffix is applied (``"1.5"``) is rejected rather than rounded.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"{text}: must not be negative")
        return text
    match = _COUNT.match(str(text))
    if not match:
        raise ValueError(f"{text!r}: expected a count such as 32B, 32e9, 10M or 32768")
    number, suffix = match.groups()
    scale = (1024 if binary else 1000) ** _SUFFIXES[suffix.lower()]
    value = Decimal(number.replace("_", "").replace(",", "")) * scale
    if value != value.to_integral_value():
        raise ValueError(f"{text!r}: not a whole number")
    return int(value)


def load_book(path: Path | None) -> ProfileBook:
    """The built-in tables, with the entries of a TOML file added or replaced by key."""
    book = ProfileBook()
    if path is None:
        return book
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError("", f"cannot read profiles file: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"profiles file is not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ConfigError(unknown[0], f"unknown section (expected one of {', '.join(_SECTIONS)})")
    tables: dict[str, dict[str, Any]] = {
        "hardware": dict(book.hardware),
        "accelerators": dict(book.accelerators),
        "models": dict(book.models),
    }
    for section, builder in _SECTIONS.items():
        entries = data.get(section, {})
        if not isinstance(entries, dict):
            raise ConfigError(section, "must be a table of named entries")
        for key, entry in entries.items():
            if not isinstance(entry, dict):
                raise ConfigError(f"{section}.{key}", "must be a table")
            tables[section][key] = builder(f"{section}.{key}", key, entry, tables[section])
    return ProfileBook(tables["hardware"], tables["accelerators"], tables["models"])


class _Entry:
    """Reads one TOML table field by field, naming the exact setting in every error."""

    def __init__(self, where: str, entry: dict[str, Any], allowed: set[str]):
        self.where = where
        self.entry = entry
        extra = sorted(set(entry) - allowed)
        if extra:
            raise ConfigError(f"{where}.{extra[0]}", "unknown setting")

    def text(self, name: str, default: str | None = None) -> str:
        value = self.entry.get(name, default)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{self.where}.{name}", "required, as a non-empty string")
        return value

    def number(self, name: str, default: Decimal | None = None) -> Decimal:
        value = self.entry.get(name)
        if value is None and default is not None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"{self.where}.{name}", "required, as a number")
        try:
            # str() first: a TOML float such as 0.8 must become Decimal("0.8"), not its binary
            number = Decimal(str(value))
        except InvalidOperation as exc:
            raise ConfigError(f"{self.where}.{name}", f"not a number: {value!r}") from exc
        if not number.is_finite() or number < 0:
            raise ConfigError(f"{self.where}.{name}", "must be a finite number, not negative")
        return number

    def count(self, name: str, default: int | None = None, *, minimum: int = 1) -> int:
        value = self.entry.get(name, default)
        try:
            count = parse_count(value) if isinstance(value, int | str) else None
        except ValueError:
            count = None
        if count is None or count < minimum:
            raise ConfigError(f"{self.where}.{name}", f"required, as a whole number >= {minimum}")
        return count


def _hardware(where: str, key: str, entry: dict[str, Any], known: dict[str, Any]) -> Any:
    base = known.get(key)
    allowed = {
        "name",
        "accelerator",
        "accelerator_count",
        "ram_gb",
        "tokens_per_second",
        "price",
        "power_kw",
        "ops_per_month",
        "currency",
    }
    e = _Entry(where, entry, allowed)
    if base is not None:  # a partial table edits the built-in profile of that name
        return _edit_hardware(e, base)
    currency = e.text("currency", "CNY")
    if currency not in ("CNY", "USD"):
        raise ConfigError(f"{where}.currency", "must be CNY or USD")
    return HardwareProfile(
        key=key,
        name=e.text("name", key),
        accelerator=e.text("accelerator"),
        accelerator_count=e.count("accelerator_count", 1),
        ram_gb=e.count("ram_gb", 0, minimum=0),
        tokens_per_second=e.number("tokens_per_second"),
        price=e.number("price"),
        power_kw=e.number("power_kw"),
        ops_per_month=e.number("ops_per_month"),
        currency="USD" if currency == "USD" else "CNY",
    )


def _edit_hardware(e: _Entry, base: HardwareProfile) -> HardwareProfile:
    changes: dict[str, Any] = {}
    for name in e.entry:
        if name in ("name", "accelerator"):
            changes[name] = e.text(name)
        elif name in ("accelerator_count", "ram_gb"):
            changes[name] = e.count(name, minimum=1 if name == "accelerator_count" else 0)
        elif name == "currency":
            if e.entry[name] not in ("CNY", "USD"):
                raise ConfigError(f"{e.where}.currency", "must be CNY or USD")
            changes[name] = e.entry[name]
        else:
            changes[name] = e.number(name)
    return replace(base, **changes)


def _accelerator(where: str, key: str, entry: dict[str, Any], known: dict[str, Any]) -> Any:
    e = _Entry(where, entry, {"name", "memory_gib", "tdp_w", "source"})
    tdp = e.count("tdp_w") if "tdp_w" in entry else None
    return Accelerator(
        key, e.text("name", key), e.number("memory_gib"), tdp, e.text("source", "user")
    )


def _model(where: str, key: str, entry: dict[str, Any], known: dict[str, Any]) -> Any:
    e = _Entry(where, entry, {"name", "params", "layers", "kv_heads", "head_dim"})
    shape = [e.count(n) if n in entry else None for n in ("layers", "kv_heads", "head_dim")]
    return ModelProfile(key, e.text("name", key), e.count("params"), *shape)


_SECTIONS: dict[str, Callable[[str, str, dict[str, Any], dict[str, Any]], Any]] = {
    "hardware": _hardware,
    "accelerators": _accelerator,
    "models": _model,
}
