"""The roi chart: monthly cost against monthly token volume, as a PNG.

The numbers come from :func:`spillway.planner.roi.cost_curves` as ``Decimal``; they become
floats here and only here, for plotting. No pyplot: a bare ``Figure`` keeps no global state.
matplotlib (the ``charts`` extra) is imported only to draw, so ``volume_range`` and importing
this module need none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path


def volume_range(volume: int, *, points: int = 121) -> list[int]:
    """Log-spaced volumes from 1/100 to 100x the user's volume (at least 1M to 10B tokens)."""
    low = min(10**6, max(volume // 100, 1))
    high = max(10**10, volume * 100)
    ratio = (high / low) ** (1 / (points - 1))
    return sorted(({round(low * ratio**i) for i in range(points)} | {volume}) - {0})


def save_cost_chart(
    path: Path,
    volumes: Sequence[int],
    cloud: Mapping[str, Sequence[Decimal]],
    private: Mapping[str, Sequence[Decimal]],
    *,
    volume: int,
    currency: str,
    subtitle: str = "",
) -> None:
    """Cloud lines (dashed) per provider, private lines (solid, stepping up where one more box
    is needed) per profile, the user's volume marked; log scales on both axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6), layout="constrained")
    ax = fig.add_subplot()
    x = [float(v) for v in volumes]
    for name, costs in cloud.items():
        ax.plot(x, _floats(costs), linestyle="--", linewidth=1.4, label=f"cloud: {name}")
    for name, costs in private.items():
        ax.step(x, _floats(costs), where="post", linewidth=2.2, label=f"private: {name}")
    ax.axvline(float(volume), color="black", linewidth=1, linestyle=":")
    ax.annotate(
        f"your volume\n{volume:,} tokens",
        xy=(float(volume), 1.0),
        xycoords=("data", "axes fraction"),
        xytext=(4, -4),
        textcoords="offset points",
        va="top",
        fontsize=8,
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens per month")
    ax.set_ylabel(f"monthly cost ({currency})")
    ax.set_title("Private hardware vs cloud: monthly cost" + (f"\n{subtitle}" if subtitle else ""))
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.savefig(path, format="png", dpi=120)


def _floats(values: Sequence[Decimal]) -> list[float]:
    # zero cannot be drawn on a log axis; matplotlib drops NaN points instead of failing
    return [float(v) if v > 0 else float("nan") for v in values]
