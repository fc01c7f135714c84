"""A chart a manager can read: what we spent each day, what it would have cost, and where
the answers came from (private fleet, cloud, cache). matplotlib (the ``charts`` extra) is
imported only to draw: importing this module needs none."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import date
from decimal import Decimal
from pathlib import Path

from spillway.ledger.records import LedgerRecord

SOURCES = ("private", "cloud", "cache")
COLOURS = {"private": "#2f6f4f", "cloud": "#c8553d", "cache": "#6c8ebf"}


def spend_chart(records: Sequence[LedgerRecord], path: Path, currency: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days = sorted({r.at.date() for r in records})
    fig, (costs, split) = plt.subplots(1, 2, figsize=(12, 4.5), width_ratios=[2, 1])
    for source in SOURCES:
        daily = [_sum(r.cost for r in records if r.at.date() == d and r.source == source)
                 for d in days]  # fmt: skip
        costs.bar(days, daily, label=f"spent: {source}", color=COLOURS[source],
                  bottom=_bottoms(records, days, source))  # fmt: skip
    reference = [_sum(r.reference_cost for r in records if r.at.date() == d) for d in days]
    costs.plot(days, reference, color="black", marker="o", label="same tokens at reference price")
    costs.set_title("Cost per day")
    costs.set_ylabel(currency)
    costs.legend(loc="center left", fontsize=8)  # the middle is empty: spend sits far below
    costs.tick_params(axis="x", rotation=30)
    counts = [sum(r.source == s for r in records) for s in SOURCES]
    if sum(counts):
        split.pie(counts, labels=[f"{s} ({c})" for s, c in zip(SOURCES, counts, strict=True)],
                  colors=[COLOURS[s] for s in SOURCES], autopct="%1.0f%%")  # fmt: skip
    split.set_title("Who answered (requests)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bottoms(records: Sequence[LedgerRecord], days: list[date], source: str) -> list[float]:
    earlier = SOURCES[: SOURCES.index(source)]
    return [_sum(r.cost for r in records if r.at.date() == d and r.source in earlier) for d in days]


def _sum(values: Iterable[Decimal]) -> float:
    return float(sum(values, Decimal(0)))  # floats only for drawing
