"""Personal-data detectors, the body scan and the policy (``spillway.pii``), and the
evaluation set's targets (recall >= 0.99 per kind, false positives <= 1 %)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from spillway.config.privacy import BUILT_IN_KINDS, CorsConfig, PiiConfig
from spillway.errors import PiiDetected
from spillway.pii.detectors import BUILT_IN, KINDS, Scanner, custom_detector, mask
from spillway.pii.policy import PiiPolicy, policy_for
from spillway.pii.scan import scan_body

SCANNER = Scanner()
DATA = Path(__file__).parent / "data" / "pii_eval.jsonl"


def kinds(text: str) -> list[tuple[str, str]]:
    return [(f.kind, text[f.start : f.end]) for f in SCANNER.find(text)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("身份证11010519491231002X。", ("resident_id", "11010519491231002X")),
        ("id 11010519491231002x", ("resident_id", "11010519491231002x")),
        ("id 110105 19491231 002X ok", ("resident_id", "110105 19491231 002X")),
        ("id 110105-19491231-002X", ("resident_id", "110105-19491231-002X")),
        ("电话13812345678联系我", ("mobile", "13812345678")),
        ("call +86 138 1234 5678", ("mobile", "+86 138 1234 5678")),
        ("call 0086-13812345678", ("mobile", "0086-13812345678")),
        ("call 138-1234-5678.", ("mobile", "138-1234-5678")),
        ("\uff11\uff13\uff18\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18", ("mobile", None)),
        ("card 4111 1111 1111 1111 ok", ("bank_card", "4111 1111 1111 1111")),
        ("card 6222021234567890128", ("bank_card", "6222021234567890128")),
        ("mail zhang.wei+x@mail.example.com.cn now", ("email", "zhang.wei+x@mail.example.com.cn")),
    ],
)
def test_each_kind_is_found_in_each_of_its_formats(
    text: str, expected: tuple[str, str | None]
) -> None:
    found = kinds(text)
    assert len(found) == 1 and found[0][0] == expected[0]
    if expected[1] is not None:
        assert found[0][1] == expected[1]


@pytest.mark.parametrize(
    "text",
    [
        "ts 1733472000123",  # a timestamp in ms: phone digits inside a longer number
        "x 813812345678 y",
        "13812345678.5 and 0.13812345678",  # decimals
        "id 110105194912310021",  # wrong check digit
        "id 110105199002300023",  # 30 February
        "id 99010519491231002X",  # no such province
        "card 4111 1111 1111 1112",  # Luhn fails
        "order 2024120612345678",  # not an issuer's prefix
        "sha 3f110105194912310029ab9d",  # inside a hash
        "v13.8.1234, 138.123.45.67, user@localhost, react@18.2.0",
    ],
)
def test_hard_negatives_are_not_personal_data(text: str) -> None:
    assert kinds(text) == []


def test_an_id_is_never_also_a_card_and_findings_are_in_order() -> None:
    text = "卡 4111111111111111, 身份证 11010519491231002X, 手机 13812345678"
    assert [k for k, _ in kinds(text)] == ["bank_card", "resident_id", "mobile"]


def test_mask_replaces_each_finding_with_its_kind() -> None:
    text = "电话13812345678, mail a@example.com"
    assert mask(text, SCANNER.find(text)) == "电话[MOBILE], mail [EMAIL]"


def test_the_config_knows_the_built_in_kinds_the_detectors_have() -> None:
    """config (layer 0) cannot import the detectors: its list of names is checked here."""
    assert KINDS == BUILT_IN_KINDS


def test_custom_patterns_find_what_the_operator_names() -> None:
    scanner = Scanner((*BUILT_IN, custom_detector("employee_id", r"EMP-\d{6}")))
    found = scanner.find("staff EMP-004211 and 13812345678")
    assert [f.kind for f in found] == ["employee_id", "mobile"]


def test_the_scan_walks_keys_numbers_and_nested_text_skips_data_and_leaves_the_original() -> None:
    blob = "QUJD" * 100 + "13812345678"  # base64 of an image: encoded data, not words
    body: dict[str, Any] = {
        "model": "m",
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "call 13812345678"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,13812345678"}},
                {"type": "input_audio", "input_audio": {"data": blob, "format": "wav"}},
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "a@example.com"},
        ],
        "metadata": {"13912345678": "a key", "phone": 13712345678, "data": "b@example.com"},
    }  # fmt: skip
    original = json.dumps(body)
    scan = scan_body(body, SCANNER, want_masked=True)
    assert scan.counts == {"mobile": 3, "email": 2}
    assert json.dumps(body) == original
    assert scan.masked is not None
    parts = scan.masked["messages"][0]["content"]
    assert parts[0]["text"] == "call [MOBILE]"
    assert parts[1] is body["messages"][0]["content"][1]  # untouched parts are shared
    assert parts[2]["input_audio"]["data"] == blob
    assert scan.masked["messages"][1]["content"] == "[EMAIL]"
    assert scan.masked["metadata"] == {"[MOBILE]": "a key", "phone": "[MOBILE]", "data": "[EMAIL]"}


def test_block_names_kinds_and_counts_never_values() -> None:
    policy = PiiPolicy("block", SCANNER)
    with pytest.raises(PiiDetected) as caught:
        policy.check({"messages": [{"role": "user", "content": "13812345678 13912345678"}]}, None)
    assert "2 mobile" in str(caught.value) and "138" not in str(caught.value)
    assert caught.value.code == "pii_detected" and caught.value.status == 400


def test_a_key_action_overrides_the_configured_one() -> None:
    policy = policy_for(PiiConfig(action="block"))
    body = {"input": "a@example.com"}
    assert policy.check(body, "off") is None
    verdict = policy.check(body, "private_only")
    assert verdict is not None and verdict.private_only and verdict.counts == {"email": 1}
    masked = policy.check(body, "mask")
    assert masked is not None and masked.cloud_body == {"input": "[EMAIL]"}


def test_config_refuses_bad_custom_patterns_and_origins() -> None:
    with pytest.raises(ValidationError, match="built-in"):
        PiiConfig(custom=({"name": "email", "pattern": "x"},))  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="regular expression"):
        PiiConfig(custom=({"name": "bad", "pattern": "("},))  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="empty"):
        PiiConfig(custom=({"name": "any", "pattern": ".*"},))  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="wildcard"):
        CorsConfig(allow_origins=("*",))
    with pytest.raises(ValidationError, match="no path"):
        CorsConfig(allow_origins=("https://app.example.com/x",))
    cors = CorsConfig(allow_origins=("https://App.Example.com/", "http://localhost:5173"))
    assert cors.allow_origins == ("https://app.example.com", "http://localhost:5173")
    # as browsers send them: IPv6 bracketed, a default port left out
    cors = CorsConfig(allow_origins=("http://[::1]:8080", "https://a.example.com:443"))
    assert cors.allow_origins == ("http://[::1]:8080", "https://a.example.com")


def test_the_evaluation_set_meets_the_targets() -> None:
    """recall >= 0.99 for each kind, false positives <= 1 % (bench/pii_eval.py prints them
    with the scan's speed); the set is written by scripts/make_pii_eval.py."""
    lines = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]
    found = {kind: 0 for kind in ("resident_id", "mobile", "bank_card", "email")}
    total = dict.fromkeys(found, 0)
    false_alarms = negatives = 0
    for line in lines:
        seen = [f.kind for f in SCANNER.find(line["text"])]
        if not line["kinds"]:
            negatives += 1
            false_alarms += bool(seen)
            continue
        (kind,) = line["kinds"]
        total[kind] += 1
        found[kind] += seen == [kind]
    assert negatives >= 1000 and min(total.values()) >= 300
    assert {k: found[k] / total[k] for k in found} == pytest.approx(
        dict.fromkeys(found, 1.0), abs=0.01
    )
    assert false_alarms / negatives <= 0.01
