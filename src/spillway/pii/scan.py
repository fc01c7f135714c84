"""Every piece of a request's text a node would see, scanned for personal data, and masked.

A node reads more than ``messages[].content``: content-part arrays, tool results, the
arguments of earlier tool calls, the system prompt, the ``user`` field, ``metadata``, tool
descriptions, an embeddings ``input``. So the scan walks the whole body, not a list of known
fields that a new API field would slip past: every string value, every object key, and every
number (a phone number sent as an integer is still one). It skips only encoded data, which is
not words and whose long runs of digits and letters would be noise: ``data:`` URLs and long
base64 blobs (an image, a piece of audio).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from spillway.pii.detectors import Scanner, mask

#: a string this long, of base64's characters only, is encoded data (an image, audio)
MIN_BLOB = 256
_BLOB = re.compile(r"[A-Za-z0-9+/=_-]+")


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
        return _text(value, scanner, counts, rewrite)
    if isinstance(value, dict):
        changed = False
        items = {}
        for key, item in value.items():
            new_key = _text(key, scanner, counts, rewrite) if isinstance(key, str) else key
            new_item = _walk(item, scanner, counts, rewrite)
            changed = changed or new_key is not key or new_item is not item
            items[new_key] = new_item
        return items if changed else value
    if isinstance(value, list):
        listed = [_walk(item, scanner, counts, rewrite) for item in value]
        return listed if any(a is not b for a, b in zip(listed, value, strict=True)) else value
    if isinstance(value, int | float) and not isinstance(value, bool):
        text = str(value)
        masked = _text(text, scanner, counts, rewrite)
        return masked if masked is not text else value
    return value


def _text(text: str, scanner: Scanner, counts: Counter[str], rewrite: bool) -> str:
    if text.startswith("data:") or (len(text) >= MIN_BLOB and _BLOB.fullmatch(text)):
        return text  # encoded data, not words
    findings = scanner.find(text)
    if not findings:
        return text
    counts.update(f.kind for f in findings)
    return mask(text, findings) if rewrite else text
