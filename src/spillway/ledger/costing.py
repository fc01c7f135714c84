"""What an answer cost, and what it would have cost at the reference price.

Cloud nodes cost their price per token. A private node costs its running cost per hour
(amortised hardware, power, operations) spread over the tokens it actually served in the last
hour: the measured utilisation. An idle accelerator's hour therefore lands on the few requests
it served, which is the honest figure; a busy one's cost per token falls. Nodes with neither a
price nor a hardware cost are counted as free and say so in docs/pricing.md.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal

from spillway.clock import Clock
from spillway.config.schema import HardwareCost
from spillway.prices import AMOUNT_QUANTUM, FREE, Currency, Exchange, Price

HOURS_PER_MONTH = Decimal(730)  # 365 * 24 / 12
WINDOW_S = 3600.0
_BUCKET_S = 60.0


def hourly_cost(hardware: HardwareCost, exchange: Exchange, currency: Currency) -> Decimal:
    """Running cost per hour of a private node, in ``currency``."""
    monthly = hardware.price / hardware.amortisation_months + hardware.ops_per_month
    per_hour = monthly / HOURS_PER_MONTH + hardware.power_kw * hardware.electricity_per_kwh
    return exchange.convert(per_hour, hardware.currency, currency)


@dataclass(frozen=True, slots=True)
class Charge:
    cost: Decimal
    reference_cost: Decimal


class UtilisationWindow:
    """Tokens a node served in the last hour, in one-minute buckets."""

    def __init__(self, clock: Clock):
        self._clock = clock
        self._buckets: deque[tuple[float, int]] = deque()
        self._total = 0

    def add(self, tokens: int) -> int:
        """Count ``tokens`` and return the hour's total, this request included."""
        now = self._clock.monotonic()
        self._expire(now)
        start = now - now % _BUCKET_S
        if self._buckets and self._buckets[-1][0] == start:
            self._buckets[-1] = (start, self._buckets[-1][1] + tokens)
        else:
            self._buckets.append((start, tokens))
        self._total += tokens
        return self._total

    def tokens(self) -> int:
        self._expire(self._clock.monotonic())
        return self._total

    def _expire(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] <= now - WINDOW_S:
            self._total -= self._buckets.popleft()[1]


class Costing:
    """Turns a request's tokens into money, in the ledger currency."""

    def __init__(
        self,
        prices: Mapping[str, Price],
        hourly: Mapping[str, Decimal],
        reference: Price,
        exchange: Exchange,
        currency: Currency,
        clock: Clock,
        batch_prices: Mapping[str, Price] | None = None,
    ):
        self._prices = dict(prices)
        #: the prices batch lines pay, where a node gives a batch discount
        self._batch_prices = dict(batch_prices or {})
        self._hourly = dict(hourly)
        self._reference = reference
        self._exchange = exchange
        self.currency: Currency = currency
        self._windows = {node: UtilisationWindow(clock) for node in self._hourly}

    def charge(
        self, node: str | None, prompt_tokens: int, completion_tokens: int, batch: bool = False
    ) -> Charge:
        """``batch``: a batch line, which pays the node's batch price where it has one."""
        reference = self._in_ledger_currency(
            self._reference.cost(prompt_tokens, completion_tokens), self._reference.currency
        )
        if node is None:
            return Charge(Decimal(0), reference)
        if batch and node in self._batch_prices:
            price = self._batch_prices[node]
            cost = price.cost(prompt_tokens, completion_tokens)
            return Charge(self._in_ledger_currency(cost, price.currency), reference)
        return Charge(self._node_cost(node, prompt_tokens + completion_tokens,
                                      prompt_tokens, completion_tokens), reference)  # fmt: skip

    def estimate(self, node: str, prompt_tokens: int, completion_tokens: int) -> Decimal:
        """The most this request could cost on ``node`` (for budget reservations)."""
        if node in self._hourly:
            tokens = prompt_tokens + completion_tokens
            share = Decimal(tokens) / Decimal(max(self._windows[node].tokens() + tokens, 1))
            return _quantize(self._hourly[node] * share)
        price = self._prices.get(node, FREE)
        return self._in_ledger_currency(
            price.cost(prompt_tokens, completion_tokens), price.currency
        )

    def _node_cost(self, node: str, tokens: int, prompt: int, completion: int) -> Decimal:
        if node in self._hourly:
            served = self._windows[node].add(tokens)
            return _quantize(self._hourly[node] * Decimal(tokens) / Decimal(max(served, 1)))
        price = self._prices.get(node, FREE)
        return self._in_ledger_currency(price.cost(prompt, completion), price.currency)

    def _in_ledger_currency(self, amount: Decimal, currency: Currency) -> Decimal:
        return self._exchange.convert(amount, currency, self.currency)


def _quantize(amount: Decimal) -> Decimal:
    return amount.quantize(AMOUNT_QUANTUM, rounding=ROUND_HALF_EVEN)
