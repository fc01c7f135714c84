"""Batches through the real openai SDK (docs/batch.md): files up and down, a batch run on
spare private capacity with every custom_id answered exactly once and by its own answer,
validation before anything runs, tenants kept apart, cancel, and a batch carried on by the
next gateway after the first one stops mid-way. Scripted nodes record what they were sent."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from spillway.batch.jobs import BatchStore
from spillway.ledger.sql import SqlLedgerStore
from tests.fakes.gateway import RunningGateway, node, running_gateway
from tests.fakes.upstream import FakeUpstream, Script

KEY_A, KEY_B = "tenant-a-key-0001", "tenant-b-key-0002"
PRICE = {"input_per_mtok": 0, "output_per_mtok": 1, "batch_discount": "0.5"}
DONE = ("completed", "failed", "expired", "cancelled")


def chat_line(i: int, **body: Any) -> bytes:
    request = {"model": "m", "messages": [{"role": "user", "content": f"question {i}"}], **body}
    line = {"custom_id": f"q-{i}", "method": "POST", "url": "/v1/chat/completions", "body": request}
    return orjson.dumps(line)


def config(up: FakeUpstream, data_dir: Path, **batch: Any) -> dict[str, Any]:
    return {
        "server": {"data_dir": str(data_dir)},
        "nodes": {"a": {**node("private", up.base_url), "max_concurrency": 8, "price": PRICE}},
        "keys": [{"key": KEY_A, "tenant": "a"}, {"key": KEY_B, "tenant": "b"}],
        "cache": {"mode": "off"},
        "ledger": {"flush_interval_s": 0.05},
        "batch": {"poll_s": 0.2, "checkpoint_s": 0.2, "max_share": 0.5, **batch},
    }


@pytest.fixture
async def up() -> AsyncIterator[FakeUpstream]:
    fake = await FakeUpstream("a", script=Script(echo=True)).start()
    yield fake
    await fake.stop()


@pytest.fixture
async def gw(up: FakeUpstream, tmp_path: Path) -> AsyncIterator[RunningGateway]:
    async with running_gateway(config(up, tmp_path)) as running:
        yield running


async def submit(client: openai.AsyncOpenAI, lines: list[bytes], window: str = "24h") -> Any:
    uploaded = await client.files.create(file=("in.jsonl", b"\n".join(lines)), purpose="batch")
    return await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window=window
    )


async def until_done(client: openai.AsyncOpenAI, batch_id: str, limit_s: float = 60) -> Any:
    start = time.monotonic()
    while True:
        batch = await client.batches.retrieve(batch_id)
        if batch.status in DONE:
            return batch
        assert time.monotonic() - start < limit_s, f"still {batch.status}"
        await asyncio.sleep(0.1)


async def until(
    client: openai.AsyncOpenAI, batch_id: str, holds: Callable[[Any], bool], limit_s: float = 30
) -> None:
    """Poll the batch every 50 ms until ``holds`` is true of it."""
    for _ in range(int(limit_s / 0.05)):
        if holds(await client.batches.retrieve(batch_id)):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the batch never got there")


async def lines_of(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = await client.files.content(file_id)
    return [json.loads(line) for line in content.text.splitlines()]


async def test_each_line_is_answered_once_by_its_own_answer(gw, up, tmp_path):
    client = gw.client(KEY_A)
    batch = await submit(client, [chat_line(i, max_tokens=8) for i in range(300)])
    assert batch.status == "validating" and batch.request_counts.total == 0
    done = await until_done(client, batch.id)
    assert done.status == "completed", done.errors
    assert (done.request_counts.total, done.request_counts.completed) == (300, 300)
    assert done.error_file_id is None
    rows = await lines_of(client, done.output_file_id)
    assert sorted(r["custom_id"] for r in rows) == sorted(f"q-{i}" for i in range(300))
    for row in rows:
        number = row["custom_id"].removeprefix("q-")
        body = row["response"]["body"]
        assert row["response"]["status_code"] == 200 and row["error"] is None
        assert body["choices"][0]["message"]["content"] == f"echo: question {number}"
        assert body["usage"]["completion_tokens"] == 4
    assert up.peak_in_flight <= 4  # max_share 0.5 of max_concurrency 8
    output = await client.files.retrieve(done.output_file_id)
    assert output.purpose == "batch_output" and output.bytes > 0
    with pytest.raises(openai.BadRequestError, match="status 'completed'"):
        await client.batches.cancel(batch.id)
    await gw.gateway.pipeline.accountant.aclose()  # flush the ledger
    records = await _ledger(tmp_path)
    mine = [r for r in records if r.batch_id == batch.id]
    assert len(mine) == 300 and {r.tenant for r in mine} == {"a"}
    assert all(r.cost == Decimal("0.000002") for r in mine)  # 4 tokens at half of 1 USD/M


async def test_validation_names_each_bad_line_and_runs_nothing(gw, up):
    lines = [
        chat_line(0),
        b"{not json",
        chat_line(0),  # the same custom_id again
        orjson.dumps(
            {"custom_id": "x", "method": "GET", "url": "/v1/chat/completions", "body": {}}
        ),
        orjson.dumps(
            {
                "custom_id": "y",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": "m", "input": "hi"},
            }
        ),
        chat_line(5, model="no-such-model"),
        chat_line(6, stream=True),
        chat_line(7, messages="not a list"),
    ]
    client = gw.client(KEY_A)
    done = await until_done(client, (await submit(client, lines)).id)
    assert done.status == "failed" and done.failed_at is not None
    found = {(e.line, e.code) for e in done.errors.data}
    assert found == {
        (2, "invalid_json_line"),
        (3, "duplicate_custom_id"),
        (4, "invalid_method"),
        (5, "mismatched_url"),
        (6, "model_not_found"),
        (7, "invalid_request"),
        (8, "invalid_request"),
    }
    assert all(e.message for e in done.errors.data)
    assert up.calls == 0


async def test_bad_requests_to_the_api_say_what_to_fix(gw):
    client = gw.client(KEY_A)
    with pytest.raises(openai.BadRequestError, match="purpose"):
        await client.files.create(file=("x.jsonl", b"{}"), purpose="fine-tune")
    uploaded = await client.files.create(file=("in.jsonl", chat_line(1)), purpose="batch")
    for args, words in (
        ({"endpoint": "/v1/completions"}, "endpoint"),
        ({"completion_window": "never"}, "completion_window"),
        ({"completion_window": "30s"}, "completion_window"),
        ({"input_file_id": "file-nothere"}, "No such File"),
    ):
        call = {
            "input_file_id": uploaded.id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            **args,
        }
        with pytest.raises((openai.BadRequestError, openai.NotFoundError), match=words):
            await client.batches.create(**call)


async def test_tenants_see_only_their_own_files_and_batches(gw):
    a, b = gw.client(KEY_A), gw.client(KEY_B)
    batch = await submit(a, [chat_line(1)])
    theirs = batch.input_file_id
    for call in (
        lambda: b.files.retrieve(theirs),
        lambda: b.files.content(theirs),
        lambda: b.files.delete(theirs),
        lambda: b.batches.retrieve(batch.id),
        lambda: b.batches.cancel(batch.id),
        lambda: b.batches.create(
            input_file_id=theirs, endpoint="/v1/chat/completions", completion_window="24h"
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            await call()
    assert [f.id async for f in b.files.list()] == []
    assert [x.id async for x in b.batches.list()] == []
    assert [f.id async for f in a.files.list()] == [theirs]
    assert [x.id async for x in a.batches.list()] == [batch.id]


async def test_a_cancel_takes_effect_within_seconds(gw, up):
    up.script = Script(echo=True, latency_s=0.2)
    client = gw.client(KEY_A)
    batch = await submit(client, [chat_line(i) for i in range(400)])
    await until(client, batch.id, lambda b: b.request_counts.completed >= 8)
    asked = time.monotonic()
    cancelling = await client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling"
    done = await until_done(client, batch.id, limit_s=10)
    took = time.monotonic() - asked
    assert done.status == "cancelled" and took < 10, took
    calls_then = up.calls
    await asyncio.sleep(0.5)
    assert up.calls == calls_then  # nothing more reached the node
    rows = await lines_of(client, done.output_file_id)
    ids = [r["custom_id"] for r in rows]
    assert len(ids) == len(set(ids)) == done.request_counts.completed < 400
    assert (await client.batches.cancel(batch.id)).status == "cancelled"  # as it is


async def test_interactive_requests_keep_their_room_while_a_batch_runs(gw, up, tmp_path):
    up.script = Script(echo=True, latency_s=0.1)
    client = gw.client(KEY_A)

    async def interactive() -> tuple[float, str]:
        start = time.monotonic()
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "now"}]
        )
        return time.monotonic() - start, raw.headers["x-spillway-source"]

    idle = sorted([(await interactive())[0] for _ in range(10)])
    batch = await submit(client, [chat_line(i) for i in range(200)])
    await until(client, batch.id, lambda b: b.status == "in_progress")
    busy: list[float] = []
    for _ in range(5):  # bursts of 4 at once: with the batch's 4, the node's 8 slots
        results = await asyncio.gather(*(interactive() for _ in range(4)))
        busy += [t for t, _ in results]
        assert {source for _, source in results} == {"private"}
    await client.batches.cancel(batch.id)
    await gw.gateway.pipeline.accountant.aclose()  # flush the ledger
    refusals = [r for r in await _ledger(tmp_path) if r.error_code == "no_spare_capacity"]
    assert refusals == []  # a line that found no room is not a request that happened
    idle_p50, busy_p50 = idle[len(idle) // 2], sorted(busy)[len(busy) // 2]
    print(f"interactive p50: idle {idle_p50 * 1000:.0f} ms, with a batch {busy_p50 * 1000:.0f} ms")
    assert busy_p50 <= 1.5 * idle_p50
    assert up.peak_in_flight <= 8


async def test_the_next_gateway_carries_on_after_a_stop_mid_way(up, tmp_path, monkeypatch):
    up.script = Script(echo=True, latency_s=0.05)
    raw = config(up, tmp_path, lease_s=3.0)
    async with running_gateway(raw) as first:
        client = first.client(KEY_A)
        batch = await submit(client, [chat_line(i) for i in range(300)])
        await until(client, batch.id, lambda b: b.request_counts.completed >= 60)

        async def crash_keeps_the_lease(self: BatchStore, batch_id: str, owner: str) -> None:
            return None  # as if the process died: the lease is not given back

        monkeypatch.setattr(BatchStore, "release", crash_keeps_the_lease)
    monkeypatch.undo()
    sent_before = up.calls
    async with running_gateway(raw) as second:
        client = second.client(KEY_A)
        done = await until_done(client, batch.id, limit_s=60)
        rows = await lines_of(client, done.output_file_id)
    assert done.status == "completed"
    ids = [r["custom_id"] for r in rows]
    assert sorted(ids) == sorted(f"q-{i}" for i in range(300))  # each exactly once
    for row in rows:
        number = row["custom_id"].removeprefix("q-")
        assert row["response"]["body"]["choices"][0]["message"]["content"] == (
            f"echo: question {number}"
        )
    redone = sent_before + (up.calls - sent_before) - 300
    print(f"lines sent to the node twice (run again after the stop): {redone}")


async def test_an_embeddings_batch(up, tmp_path):
    raw = config(up, tmp_path)
    async with running_gateway(raw) as gw:
        client = gw.client(KEY_A)
        lines = [
            orjson.dumps(
                {
                    "custom_id": f"e{i}",
                    "method": "POST",
                    "url": "/v1/embeddings",
                    "body": {"model": "m", "input": f"text {i}"},
                }
            )
            for i in range(20)
        ]
        uploaded = await client.files.create(file=("e.jsonl", b"\n".join(lines)), purpose="batch")
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
        )
        done = await until_done(client, batch.id)
        rows = await lines_of(client, done.output_file_id)
    assert done.status == "completed" and len(rows) == 20
    assert all(r["response"]["body"]["object"] == "list" for r in rows)


async def _ledger(data_dir: Path) -> list[Any]:
    store = SqlLedgerStore(f"sqlite+aiosqlite:///{data_dir / 'ledger.db'}")
    try:
        return await store.query()
    finally:
        await store.aclose()


async def test_a_cancel_while_validating_runs_nothing(gw, up):
    client = gw.client(KEY_A)
    batch = await submit(client, [chat_line(i) for i in range(20_000)])
    await client.batches.cancel(batch.id)
    done = await until_done(client, batch.id, limit_s=30)
    assert done.status == "cancelled" and up.calls == 0


async def test_an_input_in_use_cannot_be_deleted(gw):
    client = gw.client(KEY_A)
    batch = await submit(client, [chat_line(i) for i in range(5)])
    with pytest.raises(openai.BadRequestError, match="cancel it first"):
        await client.files.delete(batch.input_file_id)
    await until_done(client, batch.id)
    assert (await client.files.delete(batch.input_file_id)).deleted


async def test_lines_the_key_could_never_run_fail_validation(up, tmp_path):
    cloud = await FakeUpstream("cloud").start()
    raw = config(up, tmp_path)
    raw["nodes"]["cloud"] = {**node("cloud", cloud.base_url), "models": {"c": "c1"}}
    raw["keys"].append({"key": "private-key-0003", "tenant": "p", "private_only": True})
    async with running_gateway(raw) as gw:
        client = gw.client("private-key-0003")
        done = await until_done(client, (await submit(client, [chat_line(1, model="c")])).id)
    await cloud.stop()
    assert done.status == "failed"
    assert "No private node serves 'c'" in done.errors.data[0].message and cloud.calls == 0


async def test_one_line_that_breaks_does_not_stop_the_batch(gw, monkeypatch):
    pipeline = gw.gateway.pipeline
    chat = pipeline.chat

    async def flaky(call: Any, read: Any) -> Any:
        request = await read()
        if request.body["messages"][0]["content"] == "question 3":
            raise RuntimeError("a bug")

        async def again() -> Any:
            return request

        return await chat(call, again)

    monkeypatch.setattr(pipeline, "chat", flaky)
    client = gw.client(KEY_A)
    done = await until_done(client, (await submit(client, [chat_line(i) for i in range(10)])).id)
    assert (done.status, done.request_counts.completed, done.request_counts.failed) == (
        "completed", 9, 1,
    )  # fmt: skip
    errors = await lines_of(client, done.error_file_id)
    assert errors[0]["custom_id"] == "q-3" and errors[0]["response"]["status_code"] == 500


async def test_a_busy_model_does_not_hold_up_another(up, tmp_path):
    slow = await FakeUpstream("slow", script=Script(echo=True, latency_s=1.0)).start()
    raw = config(up, tmp_path)
    raw["nodes"]["b"] = {**node("private", slow.base_url), "models": {"n": "n1"},
                         "max_concurrency": 1}  # fmt: skip
    lines = [chat_line(i, model="n" if i % 2 else "m") for i in range(40)]
    async with running_gateway(raw) as gw:
        client = gw.client(KEY_A)
        started = time.monotonic()
        batch = await submit(client, lines)
        await until(client, batch.id, lambda b: b.request_counts.completed >= 20)
        took = time.monotonic() - started
        await client.batches.cancel(batch.id)
    await slow.stop()
    assert took < 8, took  # the 20 lines for m, while n's node serves one a second


async def test_a_form_of_many_parts_is_refused_at_once(gw):
    parts = b"".join(
        b'--B\r\nContent-Disposition: form-data; name="x%d"\r\n\r\nv\r\n' % i for i in range(500)
    )
    async with httpx.AsyncClient(base_url=gw.url) as http:
        answer = await http.post(
            "/v1/files",
            content=parts + b"--B--\r\n",
            headers={"Authorization": f"Bearer {KEY_A}",
                     "Content-Type": "multipart/form-data; boundary=B"},
        )  # fmt: skip
    assert answer.status_code == 400 and "one 'purpose' and one 'file'" in answer.text
    assert [f async for f in gw.client(KEY_A).files.list()] == []


async def test_a_model_name_is_never_quoted_back(gw, up):
    client = gw.client(KEY_A)
    done = await until_done(client, (await submit(client, [chat_line(1, model=KEY_B)])).id)
    assert done.status == "failed"
    assert KEY_B not in orjson.dumps(done.model_dump()).decode()


async def test_revoking_a_key_cancels_its_batches(up, tmp_path):
    up.script = Script(echo=True, latency_s=0.2)
    raw = config(up, tmp_path)
    raw["keys"].append({"key": "admin-key-00000009", "tenant": "ops", "admin": True})
    async with running_gateway(raw) as gw, httpx.AsyncClient(base_url=gw.url) as http:
        admin = {"Authorization": "Bearer admin-key-00000009"}
        made = (await http.post("/admin/keys", json={"tenant": "c"}, headers=admin)).json()
        client = gw.client(made["key"])
        batch = await submit(client, [chat_line(i) for i in range(200)])
        await until(client, batch.id, lambda b: b.request_counts.completed >= 2)
        await http.post(f"/admin/keys/{made['prefix']}/revoke", headers=admin)
        store = gw.gateway.batches
        assert store is not None
        for _ in range(100):
            current = await store.jobs.get(None, batch.id)
            if current.status == "cancelled":
                break
            await asyncio.sleep(0.1)
    assert current.status == "cancelled" and current.completed < 200


async def test_pages_follow_the_after_cursor(gw):
    client = gw.client(KEY_A)
    uploaded = [
        (await client.files.create(file=(f"f{i}.jsonl", chat_line(i)), purpose="batch")).id
        for i in range(3)
    ]
    paged = [f.id async for f in client.files.list(limit=1)]  # the SDK follows `after`
    assert paged == uploaded[::-1]
    oldest_first = [f.id async for f in client.files.list(limit=1, order="asc")]
    assert oldest_first == uploaded
    made = [
        (await client.batches.create(input_file_id=fid, endpoint="/v1/chat/completions",
                                     completion_window="24h")).id
        for fid in uploaded
    ]  # fmt: skip
    assert [b.id async for b in client.batches.list(limit=1)] == made[::-1]
