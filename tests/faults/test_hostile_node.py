"""A broken or hostile node, through the whole gateway: what it sends must neither fill the
gateway's memory nor reach the client as an answer, and its words must not leak its key.

Node "a" is a raw socket that sends exactly the bytes each test scripts; node "b" is a
well-behaved fake that takes over when "a" fails.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from tests.fakes.gateway import node, running_gateway
from tests.fakes.hostile import Answer, MiB, endless, fixed, gzip_bomb, raw_node
from tests.fakes.upstream import FakeUpstream, closed_port
from tests.faults.test_failover import FAST, ask
from tests.faults.test_ledger import ledger_rows

JSON = "Content-Type: application/json\r\n"
KEY_A = "node-a-key-REDTEAM-0123456789"  # not shaped like sk-…: only a's own key masks it
HUGE = f"HTTP/1.1 200 OK\r\n{JSON}Content-Length: 10737418240\r\n\r\n"


@pytest.fixture
async def b() -> AsyncIterator[FakeUpstream]:
    fake = await FakeUpstream("b").start()
    yield fake
    await fake.stop()


def fleet(a_url: str, b: FakeUpstream, **a_extra: Any) -> dict[str, Any]:
    a = node("private", a_url, api_key=KEY_A, timeouts={"total_s": 6.0}, **a_extra)
    return {"timeouts": FAST, "nodes": {"a": a, "b": node("private", b.base_url)}}


HOSTILE: dict[str, tuple[Callable[[], Answer], dict[str, Any]]] = {
    "html-200": (lambda: fixed("200 OK", b"<html><h1>502 Bad Gateway</h1></html>", JSON), {}),
    "broken-json-200": (lambda: fixed("200 OK", b'{"id": "chatcmpl-1", "choices": [{', JSON), {}),
    "10-GiB-content-length": (lambda: endless(HUGE, total=256 * MiB), {}),
    "1-GiB-gzip-bomb": (  # about 1 MiB on the wire; with the node's own, smaller limit
        lambda: fixed("200 OK", gzip_bomb(1024), f"{JSON}Content-Encoding: gzip\r\n"),
        {"max_response_bytes": 4 * MiB},
    ),
}


@pytest.mark.parametrize("hostile", HOSTILE)
async def test_an_answer_that_is_not_one_falls_back_at_once(b: FakeUpstream, hostile: str) -> None:
    """Before: the HTML and the broken JSON reached the client as 200 application/json, the
    bomb as 1 GiB of zeros, and the 10 GiB answer was read into memory until a's total_s."""
    answer, a_extra = HOSTILE[hostile]
    async with raw_node(answer()) as a, running_gateway(fleet(a.base_url, b, **a_extra)) as gw:
        started = time.monotonic()
        result = await ask(gw.client(), stream=False)
        elapsed = time.monotonic() - started
    assert (result.node, result.text) == ("b", "b-0 b-1 b-2 b-3 ")
    assert len(a.heads) == 1 and b.calls == 1
    assert elapsed < 3.0  # not a's total_s (6 s): the answer was refused, not waited out
    if hostile == "10-GiB-content-length":
        assert a.cut_off and a.sent < 32 * MiB  # the connection closed: the rest never read


async def test_readyz_shows_spillways_words_never_the_nodes(b: FakeUpstream, caplog) -> None:
    """/readyz needs no key: before, it showed the node's error text, where a node that
    echoes its key (or anything else) published it. The node's words go to the log."""
    words = f"upstream internals at 10.0.0.7, key {KEY_A} rejected"
    error = orjson.dumps({"error": {"message": words, "type": "server_error"}})
    config = fleet(f"http://127.0.0.1:{closed_port()}/v1", b)
    async with raw_node(fixed("500 Internal Server Error", error, JSON)) as a:
        config["nodes"]["broken"] = node("private", a.base_url, api_key=KEY_A)
        async with (
            running_gateway(config) as gw,
            aiohttp.ClientSession() as http,
            http.get(gw.url + "/readyz") as answer,
        ):
            text = await answer.text()
    body = orjson.loads(text)
    assert answer.status == 200 and body["ready"] is True and body["models"] == {"m": True}
    assert body["nodes"]["broken"]["state"] == "down"
    assert body["nodes"]["broken"]["error"] == "HTTP 500"
    assert body["nodes"]["a"]["error"] == "cannot connect (ConnectionRefusedError)"
    assert "internals" not in text and "REDTEAM" not in text
    assert "node broken: readiness probe failed: HTTP 500: upstream internals" in caplog.text
    assert KEY_A not in caplog.text


async def test_a_rejection_passes_on_no_key_in_any_field(b: FakeUpstream, tmp_path: Path) -> None:
    """A 400 whose param and code echo the node's Authorization header: before, the key went
    to the client in both, and into the ledger's error_code."""
    error = {
        "message": "bad request",
        "type": "invalid_request_error",
        "param": f"Authorization: Bearer {KEY_A}",
        "code": f"Bearer {KEY_A}" + "!" * 200,
    }
    config = {**fleet("", b), "server": {"data_dir": str(tmp_path)}}
    async with raw_node(fixed("400 Bad Request", orjson.dumps({"error": error}), JSON)) as a:
        config["nodes"]["a"]["base_url"] = a.base_url
        async with running_gateway(config) as gw:
            with pytest.raises(openai.BadRequestError) as caught:
                await ask(gw.client(), stream=False)
    sent = caught.value.response.text
    assert "REDTEAM" not in sent
    assert caught.value.param == "Authorization: Bearer ***"
    assert caught.value.code == ("Bearer ***" + "!" * 200)[:100]
    rows = await ledger_rows(tmp_path)
    assert [r.error_code for r in rows] == [caught.value.code]


async def test_an_in_band_stream_error_is_scrubbed_before_it_is_cut(b: FakeUpstream) -> None:
    """A committed stream, then ``{"error": "<text>"}`` whose key straddles character 300:
    before, the text was cut at 300 first, and the key's first half went to the client."""
    text = "x" * 280 + f"key={KEY_A} rest"
    delta = {"index": 0, "delta": {"content": "hi"}, "finish_reason": None}
    chunk = {"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": [delta]}
    events = b"data: " + orjson.dumps(chunk) + b"\n\ndata: " + orjson.dumps({"error": text})
    sse = fixed("200 OK", events + b"\n\n", "Content-Type: text/event-stream\r\n")
    async with raw_node(sse) as a, running_gateway(fleet(a.base_url, b)) as gw:
        with pytest.raises(openai.APIError, match="mid-stream") as caught:
            await ask(gw.client(), stream=True)
    said = str(caught.value)
    assert "x" * 200 in said and "key=***" in said
    assert "REDT" not in said
