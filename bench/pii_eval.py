"""How well and how fast spillway finds personal data, on the evaluation set.

    python bench/pii_eval.py            # tests/unit/data/pii_eval.jsonl

Prints, per kind, the recall (positives whose one piece of personal data was found, as that
kind), the false-positive rate (hard negatives in which anything was found, and positives
in which something else was found too), and the scan's cost per KB of prompt: over the
whole set, over a 4 KB prompt with no personal data (the common case) and over one with
some. Targets (#20): recall >= 0.99 per kind, false positives <= 1 %, <= 50 us per KB.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from spillway.pii.detectors import KINDS, Scanner

DATA = Path(__file__).resolve().parent.parent / "tests" / "unit" / "data" / "pii_eval.jsonl"
PROSE = (
    "The quarterly report covers revenue, costs and the migration of the billing service to "
    "the new cluster. 请在周五之前完成迁移，并把结果发到项目群里。Version 2.14.3 shipped on "
    "2026-11-30 with 1,204 tests; latency p99 fell from 840 ms to 310 ms. "
)


@dataclass(frozen=True)
class Figures:
    recall: dict[str, float]
    positives: dict[str, int]
    false_positive_rate: float
    negatives: int
    stray_in_positives: int


def load(path: Path = DATA) -> list[dict[str, object]]:
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


def evaluate(lines: list[dict[str, object]], scanner: Scanner) -> Figures:
    hits: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    false_alarms = negatives = stray = 0
    for line in lines:
        text, expected = str(line["text"]), dict(line["kinds"])  # type: ignore[call-overload]
        found = Counter(f.kind for f in scanner.find(text))
        if not expected:
            negatives += 1
            false_alarms += bool(found)
            continue
        for kind, count in expected.items():
            totals[kind] += 1
            hits[kind] += found[kind] >= count
        stray += any(kind not in expected for kind in found)
    recall = {kind: hits[kind] / totals[kind] for kind in totals}
    return Figures(recall, dict(totals), false_alarms / max(negatives, 1), negatives, stray)


def microseconds_per_kb(texts: list[str], scanner: Scanner, repeat: int = 5) -> float:
    size_kb = sum(len(t.encode()) for t in texts) / 1024
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        for text in texts:
            scanner.find(text)
        runs.append(time.perf_counter() - started)
    return statistics.median(runs) * 1e6 / size_kb


def main() -> int:
    scanner = Scanner()
    lines = load()
    figures = evaluate(lines, scanner)
    print(f"evaluation set: {len(lines)} texts ({DATA.name})")
    for kind in KINDS:
        if kind in figures.recall:
            print(f"  recall {kind:12} {figures.recall[kind]:.4f}  ({figures.positives[kind]})")
    print(f"  false positives: {figures.false_positive_rate:.4f} of {figures.negatives} hard "
          f"negatives; positives with a stray finding: {figures.stray_in_positives}")  # fmt: skip
    clean = (PROSE * 30)[:4096]
    dirty = (
        clean[:3000]
        + " 电话 138-1234-5678, 邮箱 li.na@example.com, 身份证 11010519491231002X "
        + clean[:1000]
    )
    texts = [str(line["text"]) for line in lines]
    over_set = microseconds_per_kb(texts, scanner)
    without = microseconds_per_kb([clean] * 50, scanner)
    with_some = microseconds_per_kb([dirty] * 50, scanner)
    print(f"  cost: {over_set:.1f} us/KB over the set, {without:.1f} us/KB for a 4 KB prompt "
          f"without personal data, {with_some:.1f} us/KB with some")  # fmt: skip
    ok = min(figures.recall.values()) >= 0.99 and figures.false_positive_rate <= 0.01
    print("targets: " + ("met" if ok else "NOT met"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
