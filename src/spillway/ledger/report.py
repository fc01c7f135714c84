"""Summaries of the ledger: spend, savings, private share, cache hit rate, latency."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from decimal import Decimal
from typing import Any

from spillway.ledger.records import LedgerRecord

DIMENSIONS: dict[str, Callable[[LedgerRecord], str]] = {
    "tenant": lambda r: r.tenant,
    "model": lambda r: r.model or "-",
    "node": lambda r: r.node or "-",
    "source": lambda r: r.source or "none",
    "day": lambda r: r.at.date().isoformat(),
    "batch": lambda r: r.batch_id or "interactive",
}


@dataclass(frozen=True)
class Summary:
    """One group of records (or all of them)."""

    group: str
    requests: int
    errors: int
    incomplete: int
    prompt_tokens: int
    completion_tokens: int
    cost: Decimal
    reference_cost: Decimal
    savings: Decimal
    private_share: float  # of answered requests
    cloud_share: float
    cache_hit_rate: float
    #: what cache hits saved against serving them again where they were first served
    cache_avoided: Decimal
    latency_p50_ms: int | None
    latency_p95_ms: int | None
    ttft_p50_ms: int | None
    ttft_p95_ms: int | None

    def as_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Decimal) else v for k, v in asdict(self).items()}


def summarize(records: Sequence[LedgerRecord], by: str) -> list[Summary]:
    """A summary per group, in group order, then the total."""
    key = DIMENSIONS[by]
    groups: dict[str, list[LedgerRecord]] = {}
    for record in records:
        groups.setdefault(key(record), []).append(record)
    rows = [summary_of(name, groups[name]) for name in sorted(groups)]
    return [*rows, summary_of("total", records)]


def summary_of(group: str, records: Sequence[LedgerRecord]) -> Summary:
    answered = [r for r in records if r.source is not None]
    cost = sum((r.cost for r in records), Decimal(0))
    reference = sum((r.reference_cost for r in answered), Decimal(0))
    latencies = [r.latency_ms for r in answered if r.status == "ok"]
    ttfts = [r.ttft_ms for r in answered if r.ttft_ms is not None]
    return Summary(
        group=group,
        requests=len(records),
        errors=sum(r.status == "error" for r in records),
        incomplete=sum(r.status == "incomplete" for r in records),
        prompt_tokens=sum(r.prompt_tokens for r in records),
        completion_tokens=sum(r.completion_tokens for r in records),
        cost=cost,
        reference_cost=reference,
        savings=reference - cost,
        private_share=_share(answered, "private"),
        cloud_share=_share(answered, "cloud"),
        cache_hit_rate=_share(answered, "cache"),
        cache_avoided=sum((r.avoided_cost for r in records), Decimal(0)),
        latency_p50_ms=percentile(latencies, 0.50),
        latency_p95_ms=percentile(latencies, 0.95),
        ttft_p50_ms=percentile(ttfts, 0.50),
        ttft_p95_ms=percentile(ttfts, 0.95),
    )


def percentile(values: Iterable[int], q: float) -> int | None:
    """Nearest-rank percentile; None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, -(-int(q * 1000) * len(ordered) // 1000))  # ceil(q * n) without floats drift
    return ordered[min(rank, len(ordered)) - 1]


def to_csv(rows: Sequence[Summary]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([f.name for f in fields(Summary)])
    for row in rows:
        writer.writerow([_cell(value) for value in row.as_json().values()])
    return out.getvalue()


def records_csv(records: Iterable[LedgerRecord]) -> Iterable[str]:
    """Every record as CSV lines (header first), for finance; amounts exact."""
    names = [f.name for f in fields(LedgerRecord)]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(names)
    yield _drain(out)
    for record in records:
        writer.writerow([_cell(getattr(record, name)) for name in names])
        yield _drain(out)


#: A text cell a spreadsheet would run as a formula starts with one of these (OWASP's list).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: object) -> str:
    """A value as a CSV cell. Text that a client or a node chose (a model name, a node's
    error code) and that a spreadsheet would take for a formula is prefixed with ``'``,
    which spreadsheets show as text; numbers are written as they are."""
    if value is None:
        return ""
    if hasattr(value, "isoformat"):
        return str(value.isoformat())
    text = str(value)
    if isinstance(value, str) and text.startswith(_FORMULA_START):
        return "'" + text
    return text


def _drain(out: io.StringIO) -> str:
    text = out.getvalue()
    out.seek(0)
    out.truncate()
    return text


def _share(records: Sequence[LedgerRecord], source: str) -> float:
    if not records:
        return 0.0
    return round(sum(r.source == source for r in records) / len(records), 4)
