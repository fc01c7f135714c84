"""Writes the personal-data evaluation set, ``tests/unit/data/pii_eval.jsonl``.

Each line is ``{"text": ..., "kinds": {kind: count}}``: positives hold one piece of personal
data in one of the formats spillway must find (docs/security.md#personal-data), inside
Chinese or English text; hard negatives hold none but look close (a wrong check digit, an
impossible birth date, a timestamp, a Luhn failure, phone digits inside a longer number, an
order number, a hash, a version, an IP address, a UUID, an amount). Values are made up from
a fixed seed, so the file is the same on every run:

    python scripts/make_pii_eval.py

``bench/pii_eval.py`` measures recall, false positives and speed on it;
``tests/unit/test_pii_eval.py`` holds the detectors to the targets.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests" / "unit" / "data" / "pii_eval.jsonl"
PER_KIND = 300
NEGATIVES = 2000
PROVINCES = [11, 12, 13, 31, 32, 33, 35, 37, 41, 42, 44, 50, 51, 53, 61, 65, 81, 82]
WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
CHECK = "10X98765432"
FULL_WIDTH = str.maketrans("0123456789", "".join(chr(0xFF10 + i) for i in range(10)))

rng = random.Random(20261206)

ZH = [
    "请联系{}办理。",
    "客户资料：{}，请核对。",
    "我的信息是{}",
    "备注：{}（已验证）",
    "{} 是他留下的。",
]
EN = [
    "Please reach the customer at {} today.",
    "Record: {}; verified by the branch.",
    "{}",
    'The form says "{}" in the field.',
    "Send it to {}, then close the ticket.",
]


def sentence(value: str) -> str:
    return rng.choice(ZH + EN).format(value)


# --- positives -------------------------------------------------------------------------------


def resident_id() -> str:
    region = f"{rng.choice(PROVINCES)}{rng.randint(1, 99):02d}{rng.randint(1, 99):02d}"
    born = date(1940, 1, 1) + timedelta(days=rng.randint(0, 27_000))
    body = f"{region}{born:%Y%m%d}{rng.randint(0, 999):03d}"
    return body + CHECK[sum(int(d) * w for d, w in zip(body, WEIGHTS, strict=True)) % 11]


def id_formats(number: str) -> str:
    style = rng.randrange(5)
    if style == 1:
        return f"{number[:6]} {number[6:14]} {number[14:]}"
    if style == 2:
        return f"{number[:6]}-{number[6:14]}-{number[14:]}"
    if style == 3:
        return number.translate(FULL_WIDTH)
    if style == 4:
        return number.lower()
    return number


def mobile() -> str:
    digits = f"1{rng.choice('3456789')}{rng.randint(0, 999_999_999):09d}"
    style = rng.randrange(8)
    grouped = {
        1: f"{digits[:3]} {digits[3:7]} {digits[7:]}",
        2: f"{digits[:3]}-{digits[3:7]}-{digits[7:]}",
        3: f"+86{digits}",
        4: f"+86 {digits}",
        5: f"0086{digits}",
        6: digits.translate(FULL_WIDTH),
        7: f"+86 {digits[:3]}-{digits[3:7]}-{digits[7:]}",
    }
    return grouped.get(style, digits)


def luhn_digit(partial: str) -> str:
    total = 0
    for i, char in enumerate(reversed(partial)):
        value = int(char)
        if i % 2 == 0:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return str((10 - total % 10) % 10)


def card_number() -> str:
    prefix, length = rng.choice(
        [("622202", 19), ("621700", 19), ("622848", 16), ("4", 16), ("53", 16), ("62", 16)]
    )
    body = prefix + "".join(rng.choice("0123456789") for _ in range(length - len(prefix) - 1))
    return body + luhn_digit(body)


def card() -> str:
    number = card_number()
    style = rng.randrange(3)
    if style == 0:
        return number
    groups = [number[i : i + 4] for i in range(0, len(number), 4)]
    return (" " if style == 1 else "-").join(groups)


def email() -> str:
    user = rng.choice(["zhang.wei", "li_na", "wangfang88", "chen+billing", "j.smith", "ops-team"])
    host = rng.choice(
        ["example.com", "mail.example.com.cn", "qq.com", "163.com", "corp.example.org"]
    )
    return f"{user}{rng.randint(0, 99) if rng.random() < 0.5 else ''}@{host}"


POSITIVES: dict[str, Callable[[], str]] = {
    "resident_id": lambda: id_formats(resident_id()),
    "mobile": mobile,
    "bank_card": card,
    "email": email,
}

# --- hard negatives --------------------------------------------------------------------------


def wrong_check_digit() -> str:
    number = resident_id()
    wrong = rng.choice([c for c in CHECK if c != number[-1]])
    return number[:-1] + wrong


def impossible_birth_date() -> str:
    number = resident_id()
    bad = rng.choice(["19901301", "20010230", "19850431", "18500101", "19990000"])
    return number[:6] + bad + number[14:]


def unknown_region() -> str:
    number = resident_id()
    return rng.choice(["00", "99", "19", "70"]) + number[2:]


def timestamp() -> str:
    seconds = rng.randint(1_500_000_000, 1_900_000_000)
    scale = rng.choice([1, 1000, 1_000_000, 1_000_000_000])
    return str(seconds * scale + rng.randint(0, scale - 1))


def luhn_failure() -> str:
    number = card_number()
    wrong = str((int(number[-1]) + rng.randint(1, 9)) % 10)
    number = number[:-1] + wrong
    if rng.random() < 0.5:
        return " ".join(number[i : i + 4] for i in range(0, len(number), 4))
    return number


def phone_inside_longer_number() -> str:
    digits = f"1{rng.choice('3456789')}{rng.randint(0, 999_999_999):09d}"
    before = "".join(rng.choice("0123456789") for _ in range(rng.randint(0, 3)))
    after = "".join(rng.choice("0123456789") for _ in range(rng.randint(1 if not before else 0, 3)))
    return before + digits + after


def order_number() -> str:
    day = date(2024, 1, 1) + timedelta(days=rng.randint(0, 700))
    tail = rng.randint(0, 10**8 - 1)
    return rng.choice([f"ORD{day:%Y%m%d}{tail:08d}", f"订单号 {day:%Y%m%d}{tail:08d}",
                       f"{day:%Y%m%d}{tail:06d}", f"SO-{day:%Y%m%d}-{tail:08d}"])  # fmt: skip


def hex_hash() -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(rng.choice([32, 40, 64])))


def version() -> str:
    return rng.choice(["v", "", "release-"]) + ".".join(
        str(rng.randint(0, 99_999_999)) for _ in range(rng.randint(2, 4))
    )


def ip_address() -> str:
    if rng.random() < 0.7:
        return ".".join(str(rng.randint(1, 254)) for _ in range(4))
    return ":".join(f"{rng.randint(0, 0xFFFF):x}" for _ in range(8))


def an_uuid() -> str:
    return str(uuid.UUID(int=rng.getrandbits(128)))


def amount() -> str:
    return rng.choice(["¥", "$", "", "CNY "]) + f"{rng.randint(0, 10**10)}.{rng.randint(0, 99):02d}"


def not_an_email() -> str:
    return rng.choice(["user@localhost", "@zhangwei 请看一下", "npm i react@18.2.0",
                       "a@b", "price@3.50 each", "name@example"])  # fmt: skip


NEGATIVES_MADE: list[Callable[[], str]] = [
    wrong_check_digit, impossible_birth_date, unknown_region, timestamp, luhn_failure,
    phone_inside_longer_number, order_number, hex_hash, version, ip_address, an_uuid,
    amount, not_an_email,
]  # fmt: skip


def main() -> None:
    lines = []
    for kind, make in POSITIVES.items():
        lines += [{"text": sentence(make()), "kinds": {kind: 1}} for _ in range(PER_KIND)]
    lines += [
        {"text": sentence(rng.choice(NEGATIVES_MADE)()), "kinds": {}} for _ in range(NEGATIVES)
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w", encoding="utf-8") as out:
        for line in lines:
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
    print(f"{len(lines)} lines -> {OUT}")


if __name__ == "__main__":
    main()
