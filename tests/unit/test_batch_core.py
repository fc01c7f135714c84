"""The pure parts of batch jobs: splitting and checking lines, duplicate custom_ids, the
output format, when a batch may spill to cloud, which nodes background work may use, and
the lease that fences every write a replica makes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from spillway.batch.jobs import BatchStore, Segment, pack_lines, unpack_lines
from spillway.batch.lines import (
    MAX_LINE_BYTES,
    output_line,
    split_lines,
    unrun_line,
    validate,
)
from spillway.batch.pace import Pace
from spillway.batch.records import BatchRecord
from spillway.clock import ManualClock
from spillway.ledger.sql import SqlLedgerStore
from spillway.pipeline.calls import Background
from spillway.pipeline.service import spare_nodes

T0 = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)


async def chunked(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def collect(data: bytes, size: int) -> list[tuple[int, bytes]]:
    return [line async for line in split_lines(chunked(data, size))]


@pytest.mark.parametrize("size", [1, 3, 7, 1024])
async def test_lines_are_split_across_any_chunking_and_keep_their_file_line(size):
    data = b'{"a":1}\n\n{"b":2}\r\n   \n{"c":3}'
    assert await collect(data, size) == [(1, b'{"a":1}'), (3, b'{"b":2}\r'), (5, b'{"c":3}')]


async def test_an_endless_line_is_cut_not_held():
    data = b"x" * (MAX_LINE_BYTES + 5000) + b"\n{}\n"
    lines = await collect(data, 1 << 20)
    assert len(lines[0][1]) == MAX_LINE_BYTES + 1 and lines[1] == (2, b"{}")


def line(custom_id: str, **changes: Any) -> bytes:
    item = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}  # fmt: skip
    item.update(changes)
    return orjson.dumps(item)


async def checked(lines: list[bytes], max_lines: int = 100) -> Any:
    async def source() -> AsyncIterator[tuple[int, bytes]]:
        for number, raw in enumerate(lines, start=1):
            yield number, raw

    return await validate(
        source(), "/v1/chat/completions", lambda m: None if m == "m" else "unknown", max_lines
    )


async def test_duplicates_are_found_whatever_their_number():
    result = await checked([line("a"), line("b"), line("a"), line("a"), line("c"), line("b")])
    found = sorted((e.line, e.message) for e in result.errors)
    assert found == [
        (3, "custom_id repeats the one on line 1"),
        (4, "custom_id repeats the one on line 1"),
        (6, "custom_id repeats the one on line 2"),
    ]


async def test_ten_thousand_copies_of_one_id_are_found_quickly():
    result = await checked([line("same")] * 10_000, max_lines=20_000)
    assert result.error_count == 9_999 and len(result.errors) == 100  # reported: the first 100


async def test_the_first_errors_by_line_are_kept_of_both_kinds():
    lines = [line("dup")] + [line("dup")] + [b"bad"] * 150
    result = await checked(lines, max_lines=1000)
    assert result.error_count == 151 and len(result.errors) == 100
    assert [e.line for e in result.errors[:3]] == [2, 3, 4]  # the early duplicate kept
    assert (await checked([])).errors[0].code == "empty_file"


def test_a_pretty_printed_answer_still_makes_one_line():
    answer = b'{\n  "choices": [],\n  "usage": {"total_tokens": 3}\n}\n'
    made = output_line("c", "r", 200, answer)
    assert made.count(b"\n") == 1 and orjson.loads(made)["response"]["body"]["usage"]


async def test_too_many_lines_stop_the_check():
    result = await checked([line(str(i)) for i in range(10)], max_lines=5)
    assert [e.code for e in result.errors] == ["too_many_lines"] and result.errors[0].line == 6


async def test_line_problems_each_get_a_code():
    bad = [
        b"[1, 2]",
        orjson.dumps({"method": "POST"}),
        line("x" * 600),
        line("u", url="/v1/embeddings"),
        line("w", body="text"),
        line("v", body={"model": "m", "messages": [], "base_url": "http://evil"}),
    ]
    codes = [e.code for e in (await checked(bad)).errors]
    assert codes == [
        "invalid_json_line",
        "missing_custom_id",
        "invalid_custom_id",
        "mismatched_url",
        "invalid_body",
        "invalid_request",
    ]


def test_output_lines_are_openais_format():
    ok = orjson.loads(output_line("c1", "rid", 200, b'{"choices":[]}'))
    assert ok["custom_id"] == "c1" and ok["id"].startswith("batch_req_")
    assert ok["response"] == {"status_code": 200, "request_id": "rid", "body": {"choices": []}}
    assert ok["error"] is None
    unrun = orjson.loads(unrun_line("c2", "batch_expired", "too late"))
    assert unrun["response"] is None and unrun["error"]["code"] == "batch_expired"


def test_line_numbers_pack_small():
    numbers = list(range(0, 200_000, 3))
    packed = pack_lines(reversed(numbers))
    assert unpack_lines(packed) == numbers and len(packed) < len(numbers) / 100
    assert unpack_lines(pack_lines([])) == [] and unpack_lines(pack_lines([7])) == [7]


def record(total: int, done: int, window_s: float, clock: ManualClock) -> BatchRecord:
    now = datetime.fromtimestamp(clock.wall(), UTC)
    return BatchRecord(
        "batch_x", "t", "k", {}, "/v1/chat/completions", "file-x", "24h", None,
        "in_progress", None, None, None,
        {"created_at": now, "expires_at": now + timedelta(seconds=window_s)},
        total=total, completed=done,
    )  # fmt: skip


def test_a_batch_spills_only_when_its_window_would_be_missed():
    clock = ManualClock(wall_start=T0.timestamp())
    pace = Pace(record(1000, 0, 3600, clock), clock, private_only=False)
    assert not pace.may_spill()  # no evidence yet, and the window is young
    for _ in range(600):  # 10 lines a second for a minute: 1000 lines need ~100 s
        clock.advance(0.1)
        pace.finished()
    assert not pace.may_spill()
    slow = Pace(record(100_000, 0, 3600, clock), clock, private_only=False)
    for _ in range(60):  # 1 line a second: 100,000 lines would take a day
        clock.advance(1.0)
        slow.finished()
    assert slow.may_spill()
    stalled = Pace(record(10, 0, 3600, clock), clock, private_only=False)
    clock.advance(61)  # nothing finished for a minute (busy, or down): not yet...
    assert not stalled.may_spill()
    clock.advance(3600 * 0.9)  # ... only in the window's last tenth
    assert stalled.may_spill()
    never = Pace(record(100_000, 0, 3600, clock), clock, private_only=True)
    clock.advance(3500)
    assert not never.may_spill()


def test_background_work_uses_only_its_share_and_the_cloud_only_when_it_may():
    def handle(name: str, private: bool, in_flight: int, limit: int = 8) -> Any:
        return SimpleNamespace(name=name, private=private, in_flight=in_flight,
                               max_concurrency=limit)  # fmt: skip

    nodes = [handle("p1", True, 3), handle("p2", True, 4), handle("p3", True, 0, limit=1),
             handle("c", False, 0)]  # fmt: skip
    names = [h.name for h in spare_nodes(nodes, Background("b", 0.5))]
    assert names == ["p1", "p3"]  # p2 is at its 4 of 8; p3 gets its one slot
    spilling = [h.name for h in spare_nodes(nodes, Background("b", 0.5, may_spill=True))]
    assert spilling == ["p1", "p3", "c"]


async def test_a_replica_that_lost_its_lease_cannot_write(tmp_path: Path):
    clock = ManualClock(wall_start=T0.timestamp())
    database = SqlLedgerStore(f"sqlite+aiosqlite:///{tmp_path / 'l.db'}", clock)
    await database.open()
    jobs = BatchStore(database, clock)
    try:
        await jobs.create(record(10, 0, 3600, clock))
        lease = timedelta(seconds=30)
        assert await jobs.claim("batch_x", "one", lease)
        assert not await jobs.claim("batch_x", "two", lease)
        assert await jobs.claimable(10) == []
        clock.advance(31)  # "one" stalled past its lease
        assert await jobs.claimable(10) == [("batch_x", "in_progress", "t")]
        assert await jobs.claim("batch_x", "two", lease)
        segment = Segment(0, "k.out", None, [1, 2], 2, 0)
        assert not await jobs.commit("batch_x", "one", segment)  # fenced off
        assert not await jobs.renew("batch_x", "one", lease)
        assert await jobs.commit("batch_x", "two", segment)
        got = await jobs.get(None, "batch_x")
        assert got.completed == 2 and [s.lines for s in await jobs.segments("batch_x")] == [[1, 2]]
    finally:
        await database.aclose()


def test_the_report_groups_by_batch():
    from spillway.ledger.report import summarize
    from tests.unit.test_ledger_store import make_record

    records = [
        make_record(1),
        make_record(2, batch_id="batch_a"),
        make_record(3, batch_id="batch_a"),
    ]
    rows = {row.group: row for row in summarize(records, "batch")}
    assert set(rows) == {"batch_a", "interactive", "total"}
    assert rows["batch_a"].requests == 2 and rows["interactive"].requests == 1


def test_one_tenants_flood_does_not_keep_another_waiting():
    from spillway.batch.worker import _fair

    waiting = [(f"a{i}", "validating", "a") for i in range(5)] + [
        ("b0", "validating", "b"),
        ("c0", "cancelling", "a"),
    ]
    order = [batch for batch, _, _ in _fair(waiting, {"a-running": "a"})]
    assert order[:2] == ["c0", "b0"]  # a cancel first, then the tenant with none running
    assert order[2:] == ["a0", "a1", "a2", "a3", "a4"]
