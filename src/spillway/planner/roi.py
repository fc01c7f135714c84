"""Private hardware against the cloud at one monthly token volume: pure functions, Decimal money.

The arithmetic, every default and the reasons for them are in docs/planner.md. In short::

    cloud   / month = tokens x (1 - cache hit rate) x blended price per token
    private / month = units x (price / amortisation months + kW x 730 h x price per kWh + ops)
    break-even month = first month m with  m x cloud  >=  units x price + m x units x (power + ops)
    capacity / month = tok/s x 2,628,000 s x max utilisation   (output tokens)

``units`` is how many boxes the volume needs (1 when one box can serve it), so the private cost
is always the cost of actually serving the volume. Tokens are ``int``; money is ``Decimal`` and
converted between CNY and USD only through :class:`spillway.prices.Exchange`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, ROUND_HALF_EVEN, Decimal

from spillway.planner.profiles import HardwareProfile
from spillway.prices import AMOUNT_QUANTUM, MILLION, Currency, Exchange, Price

#: 8,760 hours in a (non-leap) year, over 12 months.
HOURS_PER_MONTH = Decimal(730)
SECONDS_PER_MONTH = 730 * 3600
#: Share of peak throughput a box can sustain over a month: traffic has peaks and a queue that
#: runs at 100% of capacity grows without bound.
DEFAULT_MAX_UTILISATION = Decimal("0.6")
DEFAULT_AMORTISATION_MONTHS = 36
#: CNY per kWh: a typical Chinese commercial/industrial tariff (an assumption, not a quote).
DEFAULT_ELECTRICITY_PER_KWH = Decimal("0.80")
#: Reports (JSON, tables) show money to the cent; the arithmetic keeps a millionth.
CENT = Decimal("0.01")

NEVER_PAYS_OFF = (
    "On cost alone, the cloud is cheaper at this volume; "
    "private hardware may still be justified for data sovereignty."
)


@dataclass(frozen=True, slots=True)
class Workload:
    """A month of traffic.

    ``tokens_per_month`` counts every token the gateway would bill (input and output together);
    ``input_share`` is the part of them that is input (prompt). With the default 0, every token
    is priced as output, which is how the seed figures are stated. ``cache_hit_rate`` is the
    share of traffic spillway answers from its own cache: no cloud call, no private compute.
    """

    tokens_per_month: int
    cache_hit_rate: Decimal = Decimal(0)
    input_share: Decimal = Decimal(0)

    def __post_init__(self) -> None:
        if self.tokens_per_month < 0:
            raise ValueError("tokens per month must not be negative")
        for name in ("cache_hit_rate", "input_share"):
            value = getattr(self, name)
            if not Decimal(0) <= value <= Decimal(1):
                raise ValueError(f"{name.replace('_', ' ')} must be between 0 and 1")

    @property
    def miss_rate(self) -> Decimal:
        return Decimal(1) - self.cache_hit_rate

    def served_output_tokens(self) -> int:
        """Output tokens that must really be generated in a month (after cache hits)."""
        served = Decimal(self.tokens_per_month) * (Decimal(1) - self.input_share) * self.miss_rate
        return int(served.to_integral_value(rounding=ROUND_HALF_EVEN))


@dataclass(frozen=True, slots=True)
class Assumptions:
    """Everything roi assumes besides the workload; ``None`` means "the profile's own value"."""

    amortisation_months: int = DEFAULT_AMORTISATION_MONTHS
    electricity_per_kwh: Decimal = DEFAULT_ELECTRICITY_PER_KWH
    power_kw: Decimal | None = None
    ops_per_month: Decimal | None = None
    max_utilisation: Decimal = DEFAULT_MAX_UTILISATION
    exchange: Exchange = field(default_factory=Exchange)
    #: the currency of every amount in the results
    currency: Currency = "USD"
    #: the currency of ``electricity_per_kwh`` and ``ops_per_month`` (the profiles' own)
    local_currency: Currency = "CNY"

    def __post_init__(self) -> None:
        if self.amortisation_months < 1:
            raise ValueError("amortisation months must be at least 1")
        if not Decimal(0) < self.max_utilisation <= Decimal(1):
            raise ValueError("max utilisation must be above 0 and at most 1")


def cloud_monthly_cost(workload: Workload, price: Price) -> Decimal:
    """tokens x (1 - cache hit rate) x blended price, in ``price.currency``."""
    share = workload.input_share
    per_million = share * price.input_per_mtok + (Decimal(1) - share) * price.output_per_mtok
    cost = Decimal(workload.tokens_per_month) * workload.miss_rate * per_million / MILLION
    return cost.quantize(AMOUNT_QUANTUM, rounding=ROUND_HALF_EVEN)


def capacity_per_month(tokens_per_second: Decimal, max_utilisation: Decimal) -> int:
    """Output tokens one box can generate in a month at ``max_utilisation`` of its throughput."""
    tokens = tokens_per_second * SECONDS_PER_MONTH * max_utilisation
    return int(tokens.to_integral_value(rounding=ROUND_FLOOR))


def units_needed(served_tokens: int, capacity: int) -> int:
    """How many boxes it takes to serve ``served_tokens`` a month (at least one)."""
    if capacity <= 0:
        raise ValueError("a profile needs a throughput above zero")
    return max(1, -(-served_tokens // capacity))


def break_even_month(upfront: Decimal, running: Decimal, cloud: Decimal) -> int | None:
    """First month in which the cumulative cloud bill reaches the cumulative private cost.

    Private pays ``upfront`` in month 0 and ``running`` every month; the cloud bills ``cloud`` a
    month. ``None`` when the cloud costs no more than private hardware's running cost: then the
    hardware never catches up, however long it is kept.
    """
    saving = cloud - running
    if saving <= 0:
        return None
    quotient, remainder = divmod(upfront, saving)
    return max(1, int(quotient) + (1 if remainder else 0))


@dataclass(frozen=True, slots=True)
class PrivateCost:
    """What serving the volume on ``units`` boxes of one profile costs, in one currency."""

    profile: HardwareProfile
    units: int
    capacity_per_unit: int
    hardware: Decimal
    amortised: Decimal
    power: Decimal
    ops: Decimal

    @property
    def monthly(self) -> Decimal:
        return self.amortised + self.power + self.ops

    @property
    def running(self) -> Decimal:
        """The monthly cost once the hardware is paid for: power and operations."""
        return self.power + self.ops

    @property
    def capacity(self) -> int:
        return self.capacity_per_unit * self.units


def private_cost(
    profile: HardwareProfile, served_tokens: int, assumptions: Assumptions
) -> PrivateCost:
    """Amortised hardware + power + operations a month, for as many boxes as the volume needs.

    Each amount is worked out for one box, rounded, then multiplied: n boxes cost exactly n
    times one.
    """
    a = assumptions
    capacity = capacity_per_month(profile.tokens_per_second, a.max_utilisation)
    units = units_needed(served_tokens, capacity)
    power_kw = profile.power_kw if a.power_kw is None else a.power_kw
    energy = power_kw * HOURS_PER_MONTH * a.electricity_per_kwh
    if a.ops_per_month is None:
        ops = a.exchange.convert(profile.ops_per_month, profile.currency, a.currency)
    else:
        ops = a.exchange.convert(a.ops_per_month, a.local_currency, a.currency)
    hardware = a.exchange.convert(profile.price, profile.currency, a.currency)
    amortised = hardware / a.amortisation_months
    power = a.exchange.convert(energy, a.local_currency, a.currency)
    per_box = [_round(x) for x in (hardware, amortised, power, ops)]
    hardware, amortised, power, ops = (units * x for x in per_box)
    return PrivateCost(profile, units, capacity, hardware, amortised, power, ops)


def _round(amount: Decimal) -> Decimal:
    return amount.quantize(AMOUNT_QUANTUM, rounding=ROUND_HALF_EVEN)


@dataclass(frozen=True, slots=True)
class Comparison:
    """One profile against one cloud provider at the workload's volume."""

    provider: str
    cloud_monthly: Decimal
    private: PrivateCost
    break_even_month: int | None
    amortisation_months: int

    @property
    def pays_off(self) -> bool:
        """Cheaper than the cloud within the hardware's amortisation period."""
        month = self.break_even_month
        return month is not None and month <= self.amortisation_months

    @property
    def monthly_saving(self) -> Decimal:
        """Cloud minus private, per month (negative: private costs more)."""
        return self.cloud_monthly - self.private.monthly


def compare(
    workload: Workload,
    profile: HardwareProfile,
    provider: str,
    price: Price,
    assumptions: Assumptions,
) -> Comparison:
    """One profile against one provider (see :func:`roi_report` for all of them at once)."""
    private = private_cost(profile, workload.served_output_tokens(), assumptions)
    return _compare(provider, _cloud(workload, price, assumptions), private, assumptions)


def _cloud(workload: Workload, price: Price, assumptions: Assumptions) -> Decimal:
    cost = cloud_monthly_cost(workload, price)
    return assumptions.exchange.convert(cost, price.currency, assumptions.currency)


def _compare(
    provider: str, cloud: Decimal, private: PrivateCost, assumptions: Assumptions
) -> Comparison:
    month = break_even_month(private.hardware, private.running, cloud)
    return Comparison(provider, cloud, private, month, assumptions.amortisation_months)


@dataclass(frozen=True, slots=True)
class RoiReport:
    """Every profile against every provider, plus the plain-language notes to print with it."""

    workload: Workload
    assumptions: Assumptions
    cloud: Mapping[str, Decimal]
    private: Sequence[PrivateCost]
    comparisons: Sequence[Comparison]
    notes: Sequence[str]


def roi_report(
    workload: Workload,
    profiles: Iterable[HardwareProfile],
    prices: Mapping[str, Price],
    assumptions: Assumptions,
) -> RoiReport:
    if not prices:
        raise ValueError("at least one cloud provider is needed")
    cloud = {name: _cloud(workload, price, assumptions) for name, price in prices.items()}
    served = workload.served_output_tokens()
    private = [private_cost(profile, served, assumptions) for profile in profiles]
    comparisons = [
        _compare(name, cost, mine, assumptions) for mine in private for name, cost in cloud.items()
    ]
    notes = list(_notes(workload, private, comparisons))
    return RoiReport(workload, assumptions, cloud, private, comparisons, notes)


def _notes(
    workload: Workload, private: Sequence[PrivateCost], comparisons: Sequence[Comparison]
) -> Iterable[str]:
    served = workload.served_output_tokens()
    for cost in private:
        if cost.units > 1:
            p = cost.profile
            yield (
                f"{p.name} cannot serve this volume on one box: {served:,} output tokens a "
                f"month after cache hits is more than its {cost.capacity_per_unit:,} "
                f"({p.tokens_per_second} tok/s at the utilisation cap). It would take "
                f"{cost.units} boxes; the private costs shown are for {cost.units}."
            )
    for cost in private:
        mine = [c for c in comparisons if c.private is cost]
        never = [c.provider for c in mine if not c.pays_off]
        late = [c for c in mine if not c.pays_off and c.break_even_month is not None]
        if not never:
            continue
        if len(never) == len(mine):
            against = "any of the listed cloud providers"
        else:
            against = ", ".join(never)
        yield f"{cost.profile.name} does not pay off against {against} at this volume."
        for c in late:
            yield (
                f"  Against {c.provider} it breaks even only in month {c.break_even_month}, "
                f"after the {c.amortisation_months}-month amortisation period."
            )
    paying = sorted({c.provider for c in comparisons if c.pays_off})
    if len(paying) < len({c.provider for c in comparisons}):
        if paying:
            yield f"Some profile pays off against {', '.join(paying)}. Against the other providers:"
        yield NEVER_PAYS_OFF


def cost_curves(
    volumes: Sequence[int],
    workload: Workload,
    profiles: Iterable[HardwareProfile],
    prices: Mapping[str, Price],
    assumptions: Assumptions,
) -> dict[str, list[Decimal]]:
    """Monthly cost at each volume: one series per provider, then one per profile.

    The workload's cache hit rate and input share apply at every volume. A private series steps
    up where the volume needs one more box.
    """
    curves: dict[str, list[Decimal]] = {}
    scaled = [Workload(v, workload.cache_hit_rate, workload.input_share) for v in volumes]
    for name, price in prices.items():
        curves[name] = [_cloud(w, price, assumptions) for w in scaled]
    for profile in profiles:
        curves[profile.name] = [
            private_cost(profile, w.served_output_tokens(), assumptions).monthly for w in scaled
        ]
    return curves


def report_data(report: RoiReport, prices: Mapping[str, Price]) -> dict[str, object]:
    """The report as plain data for JSON: money rounded to cents, tokens as ints."""
    w, a = report.workload, report.assumptions
    return {
        "workload": {
            "tokens_per_month": w.tokens_per_month,
            "input_share": w.input_share,
            "cache_hit_rate": w.cache_hit_rate,
            "served_output_tokens": w.served_output_tokens(),
        },
        "assumptions": {
            "currency": a.currency,
            "cny_per_usd": a.exchange.cny_per_usd,
            "amortisation_months": a.amortisation_months,
            "electricity_per_kwh": a.electricity_per_kwh,
            "electricity_currency": a.local_currency,
            "max_utilisation": a.max_utilisation,
            "hours_per_month": HOURS_PER_MONTH,
        },
        "cloud": {
            name: {
                "input_per_mtok": prices[name].input_per_mtok,
                "output_per_mtok": prices[name].output_per_mtok,
                "price_currency": prices[name].currency,
                "monthly": cost.quantize(CENT),
            }
            for name, cost in report.cloud.items()
        },
        "private": [_private_data(cost) for cost in report.private],
        "comparisons": [
            {
                "profile": c.private.profile.key,
                "provider": c.provider,
                "cloud_monthly": c.cloud_monthly.quantize(CENT),
                "private_monthly": c.private.monthly.quantize(CENT),
                "monthly_saving": c.monthly_saving.quantize(CENT),
                "break_even_month": c.break_even_month,
                "pays_off": c.pays_off,
            }
            for c in report.comparisons
        ],
        "notes": list(report.notes),
    }


def _private_data(cost: PrivateCost) -> dict[str, object]:
    p = cost.profile
    money = {
        "hardware_cost": cost.hardware,
        "amortised_monthly": cost.amortised,
        "power_monthly": cost.power,
        "ops_monthly": cost.ops,
        "monthly": cost.monthly,
    }
    return {
        "profile": p.key,
        "name": p.name,
        "hardware": p.summary,
        "tokens_per_second": p.tokens_per_second,
        "units": cost.units,
        "can_serve_on_one": cost.units == 1,
        "capacity_per_unit": cost.capacity_per_unit,
        **{key: value.quantize(CENT) for key, value in money.items()},
    }
