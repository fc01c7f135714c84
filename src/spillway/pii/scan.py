"""Every piece of a request's text a node would see, scanned for personal data, and masked.

A node reads more than ``messages[].content``: content-part arrays, tool results, the
arguments of earlier tool calls, the system prompt, the ``user`` field, tool descriptions,
an embeddings ``input``. So the scan walks every string value of the body, not a list of
known fields that a new API field would slip past. It skips only values that are not text a
model reads as words: names of things (``model``, ``role``, ``type``, ids) and encoded data
(an image's ``url``, which may be a ``data:`` URL, and audio's base64 ``data``), whose long
digit runs and letters would be noise. Object keys are not scanned.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from spillway.pii.detectors import Scanner, mask

#: values under these keys are names or encoded data, not text
_NOT_TEXT = frozenset(
    {"model", "role", "type", "id", "tool_call_id", "url", "data", "detail", "format"}
)


@dataclass(frozen=True, slots=True)
class BodyScan:
    """What a body holds: how many findings of each kind, and (if asked) the body masked."""

    counts: dict[str, int]
    masked: dict[str, Any] | None = None

    @property
    def found(self) -> bool:
        return bool(self.counts)


def scan_body(body: dict[str, Any], scanner: Scanner, want_masked: bool) -> BodyScan:
    """Scan every text value of ``body``; with ``want_masked``, also return a copy with each
    finding replaced (the original is left as it is: private nodes may still get it)."""
    counts: Counter[str] = Counter()
    masked = _walk(body, scanner, counts, want_masked)
    if not counts:
        return BodyScan({})
    return BodyScan(dict(counts), masked if want_masked else None)


def _walk(value: Any, scanner: Scanner, counts: Counter[str], rewrite: bool) -> Any:
    """``value`` with its text masked (the same object where nothing changed)."""
    if isinstance(value, str):
        findings = scanner.find(value)
        if not findings:
            return value
        counts.update(f.kind for f in findings)
        return mask(value, findings) if rewrite else value
    if isinstance(value, dict):
        changed = {}
        for key, item in value.items():
            if key in _NOT_TEXT:
                continue
            new = _walk(item, scanner, counts, rewrite)
            if new is not item:
                changed[key] = new
        return {**value, **changed} if changed else value
    if isinstance(value, list):
        items = [_walk(item, scanner, counts, rewrite) for item in value]
        return items if any(a is not b for a, b in zip(items, value, strict=True)) else value
    return value
