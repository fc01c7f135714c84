"""Money: the price book and currency conversion, all in ``Decimal``.

Prices are per million tokens, input and output apart. List prices are public 2026 list
prices (sources in docs/pricing.md); a node's own price comes from ``nodes.NAME.price``.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Literal

Currency = Literal["USD", "CNY"]
MILLION = Decimal(1_000_000)
#: Ledger amounts are kept to a millionth of a unit: a single token can cost less than a cent.
AMOUNT_QUANTUM = Decimal("0.000001")
ZERO_AMOUNT = Decimal(0).quantize(AMOUNT_QUANTUM)


@dataclass(frozen=True, slots=True)
class Price:
    """What a million input and output tokens cost, in one currency."""

    input_per_mtok: Decimal
    output_per_mtok: Decimal
    currency: Currency = "USD"

    def cost(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        if not (self.input_per_mtok or self.output_per_mtok):
            return ZERO_AMOUNT  # a private node without a price: no Decimal arithmetic
        total = (
            self.input_per_mtok * prompt_tokens + self.output_per_mtok * completion_tokens
        ) / MILLION
        return total.quantize(AMOUNT_QUANTUM, rounding=ROUND_HALF_EVEN)


FREE = Price(Decimal(0), Decimal(0))

#: Public list prices, USD per million tokens (input, output). See docs/pricing.md.
LIST_PRICES: dict[str, Price] = {
    "gpt-4.1": Price(Decimal("2.00"), Decimal("8.00")),
    "claude-sonnet-4.5": Price(Decimal("3.00"), Decimal("15.00")),
    "gemini-2.5-flash": Price(Decimal("0.30"), Decimal("2.50")),
    "deepseek-v3.2": Price(Decimal("0.28"), Decimal("0.42")),
    "holysheep": Price(Decimal("0.28"), Decimal("0.35")),
}

DEFAULT_REFERENCE = "gpt-4.1"


@dataclass(frozen=True, slots=True)
class Exchange:
    """Converts between USD and CNY at one configured rate (CNY per USD)."""

    cny_per_usd: Decimal = Decimal("7.10")

    def convert(self, amount: Decimal, source: Currency, target: Currency) -> Decimal:
        if source == target:
            return amount
        rate = self.cny_per_usd
        converted = amount * rate if source == "USD" else amount / rate
        return converted.quantize(AMOUNT_QUANTUM, rounding=ROUND_HALF_EVEN)
