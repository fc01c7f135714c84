"""Finding personal data in text: mainland Chinese resident ID numbers, mobile numbers, bank
card numbers, e-mail addresses, and patterns an operator adds.

A number counts only where it stands alone: digits (or ASCII letters) right before or after
it mean it is part of something longer (a timestamp, an order number, a hash), so
``1733472000123`` holds no mobile number. Where a format carries a check, the check decides:
an ID's region, birth date and MOD 11-2 check digit, a card's Luhn digit and issuer prefix.
Full-width digits (U+FF10 to U+FF19) are read as digits; a finding's span is in the text as given.

Each detector is a compiled pattern plus a check, one table entry per kind, in the order they
claim text: an 18-digit run that is a valid ID is an ID, never also a card.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Literal

#: full-width digits (U+FF10-U+FF19) as ASCII: one character for one, so spans carry over
_FULL_WIDTH = {0xFF10 + i: ord("0") + i for i in range(10)}
_HAS_FULL_WIDTH = re.compile("[\uff10-\uff19]")
#: what may not touch a number on either side: more digits or ASCII letters mean it is a
#: piece of something longer (Chinese text may touch it: 电话13812345678)
#: A decimal point between digits joins them too: 0.13812345678 and 13812345678.5 are numbers.
_ALONE_BEFORE = r"(?<![0-9A-Za-z])(?<![0-9]\.)"
_ALONE_AFTER = r"(?![0-9A-Za-z])(?!\.[0-9])"

#: the first two digits of a resident ID: the province-level region (GB/T 2260), with 71
#: (Taiwan), 81 and 82 (Hong Kong, Macao) and 83 (residence permits for Taiwan residents)
_PROVINCE_CODES = (
    "11 12 13 14 15 21 22 23 31 32 33 34 35 36 37 41 42 43 44 45 46 50 51 52 53 54 "
    "61 62 63 64 65 71 81 82 83 91"
)
_PROVINCES = frozenset(_PROVINCE_CODES.split(" "))
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"

# re.ASCII: \d is 0-9 only (full-width digits are translated first; no other script's).
_RESIDENT_ID = re.compile(
    _ALONE_BEFORE + r"(\d{6})[ -]?(\d{8})[ -]?(\d{3}[0-9Xx])" + _ALONE_AFTER, re.ASCII
)
_MOBILE = re.compile(
    r"(?<![0-9A-Za-z+])(?<![0-9]\.)(?:(?:\+|00)86[ -]?)?(1[3-9]\d)[ -]?(\d{4})[ -]?(\d{4})"
    + _ALONE_AFTER,
    re.ASCII,
)
_CARD = re.compile(
    _ALONE_BEFORE + r"(?:\d{4}(?:[ -]\d{4}){3}(?:[ -]?\d{1,3})?|\d{16,19})" + _ALONE_AFTER,
    re.ASCII,
)
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*"
    r"\.[A-Za-z]{2,24}(?![A-Za-z0-9-])",
    re.ASCII,
)


@dataclass(frozen=True, slots=True)
class Finding:
    """One piece of personal data: its kind and where it is (``text[start:end]``)."""

    kind: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Detector:
    kind: str
    pattern: re.Pattern[str]
    #: True if a match really is this kind (its check digit, date, prefix); None: any match
    check: Callable[[re.Match[str]], bool] | None = None
    #: where it looks: "number" only inside runs of 11 or more digits (``_NUMBER_RUN``),
    #: "at" only in text with an @, "text" everywhere (custom patterns)
    scope: Literal["number", "at", "text"] = "text"


def _valid_resident_id(match: re.Match[str]) -> bool:
    region, birth, tail = match.groups()
    if region[:2] not in _PROVINCES or region[2:] == "0000":
        return False
    try:
        born = date(int(birth[:4]), int(birth[4:6]), int(birth[6:]))
    except ValueError:
        return False
    if not 1900 <= born.year <= 2100:
        return False
    digits = region + birth + tail[:3]
    total = sum(int(d) * w for d, w in zip(digits, _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11] == tail[3].upper()


def _valid_card(match: re.Match[str]) -> bool:
    digits = re.sub(r"[ -]", "", match.group())
    if len(digits) == 18 and _id_shaped(digits):
        return False  # an ID number with a wrong check digit, not a card
    return 16 <= len(digits) <= 19 and _issued_prefix(digits) and _luhn(digits)


def _id_shaped(digits: str) -> bool:
    """A province, then a birth year and month where an ID has them: issuers do not use
    18 digits (UnionPay cards have 16 to 19, nearly all 16 or 19)."""
    return (
        digits[:2] in _PROVINCES
        and digits[6:8] in ("18", "19", "20")
        and 1 <= int(digits[10:12]) <= 12
    )


def _issued_prefix(digits: str) -> bool:
    """Visa (4), Mastercard (51-55, 2221-2720), UnionPay (62, 81), JCB (3528-3589), Discover
    (6011, 64, 65), Diners (36): an order number or a timestamp rarely starts like these."""
    two, four = int(digits[:2]), int(digits[:4])
    return (
        digits[0] == "4"
        or 51 <= two <= 55
        or 2221 <= four <= 2720
        or two in (62, 64, 65, 81, 36)
        or 3528 <= four <= 3589
        or four == 6011
    )


def _luhn(digits: str) -> bool:
    total = 0
    for i, char in enumerate(reversed(digits)):
        value = int(char)
        if i % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


#: The built-in kinds, in the order they claim text.
BUILT_IN: tuple[Detector, ...] = (
    Detector("resident_id", _RESIDENT_ID, _valid_resident_id, "number"),
    Detector("bank_card", _CARD, _valid_card, "number"),
    Detector("mobile", _MOBILE, None, "number"),
    Detector("email", _EMAIL, None, "at"),
)
KINDS = tuple(d.kind for d in BUILT_IN)


def custom_detector(kind: str, pattern: str) -> Detector:
    """An operator's own pattern (``[[pii.custom]]``), found wherever it matches."""
    return Detector(kind, re.compile(pattern))


class Scanner:
    """Finds personal data with a fixed set of detectors.

    Prose is mostly free of it, and a regular expression with a look-behind costs as much
    at every position of the text as it does at a match: four of them cost 90 µs per KB. So
    one pass finds the runs of eleven or more digits (grouped or not) that every number kind
    needs, and the number detectors look only there (with the characters around each run in
    view for their boundary checks); e-mail is looked for only in text with an @.
    """

    def __init__(self, detectors: Sequence[Detector] = BUILT_IN):
        self._detectors = tuple(detectors)
        self._numbers = tuple(d for d in detectors if d.scope == "number")
        self._others = tuple(d for d in detectors if d.scope != "number")

    def find(self, text: str) -> list[Finding]:
        """The findings in ``text``, in order, none overlapping another."""
        plain = text.translate(_FULL_WIDTH) if _HAS_FULL_WIDTH.search(text) else text
        found: list[Finding] = []
        if self._numbers:
            for run in _NUMBER_RUN.finditer(plain):
                # One character before the run (a mobile's +), three after it (an ID's X and
                # the look-aheads' two).
                start, end = max(0, run.start() - 1), min(len(plain), run.end() + 3)
                for detector in self._numbers:
                    _claim(found, detector, detector.pattern.finditer(plain, start, end))
        for detector in self._others:
            if detector.scope == "at" and "@" not in plain:
                continue
            _claim(found, detector, detector.pattern.finditer(plain))
        found.sort(key=lambda f: f.start)
        return found


def _claim(found: list[Finding], detector: Detector, matches: Iterable[re.Match[str]]) -> None:
    """Add the matches that pass the detector's check and overlap nothing found before."""
    for match in matches:
        if detector.check is not None and not detector.check(match):
            continue
        start, end = match.span()
        if not any(f.start < end and start < f.end for f in found):
            found.append(Finding(detector.kind, start, end))


#: where a number kind can be: a digit, then ten or more digits, spaces or dashes. Looser
#: than any kind (cheaper to look for: 5 µs per KB, where an exact "eleven digits, grouped"
#: costs 12); the look-behinds of the detectors still see what precedes a run.
_NUMBER_RUN = re.compile(r"[0-9][0-9 -]{10,}", re.ASCII)


def mask(text: str, findings: Iterable[Finding]) -> str:
    """``text`` with each finding replaced by ``[KIND]`` (``[MOBILE]``, ``[EMAIL]``…)."""
    parts, at = [], 0
    for finding in findings:
        parts += [text[at : finding.start], f"[{finding.kind.upper()}]"]
        at = finding.end
    parts.append(text[at:])
    return "".join(parts)
