"""A broken or hostile node, through the whole gateway: what it sends must neither fill the
gateway's memory nor reach the client as an answer, and its words must not leak its key.

Node "a" is a raw socket that sends exactly the bytes each test scripts; node "b" is a
well-behaved fake that takes over when "a" fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from tests.fakes.gateway import node, running_gateway
from tests.fakes.hostile import Answer, GiB, MiB, RawNode, endless, fixed, gzip_bomb, raw_node
from tests.fakes.upstream import FakeUpstream, closed_port
from tests.faults.test_failover import FAST, ask, cyclic_garbage_of_spillway
from tests.faults.test_ledger import ledger_rows
from tests.faults.test_signals_live import until

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
    "an-error-behind-a-200": (  # some providers and proxies answer a failure with 200
        lambda: fixed("200 OK", orjson.dumps({"error": {"message": f"bad key {KEY_A}"}}), JSON),
        {},
    ),
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


async def _hang_up(writer: asyncio.StreamWriter, _node: RawNode) -> None:
    writer.close()  # reads the request, answers nothing


CLOSE_HEAD = f"HTTP/1.1 200 OK\r\n{JSON}Connection: close\r\n\r\n"
SSE_CLOSE_HEAD = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
FAILING: dict[str, tuple[Callable[[], Answer], bool]] = {
    "stream, node hangs up": (lambda: _hang_up, True),
    "400 passed back": (
        lambda: fixed("400 Bad Request", b'{"error": {"message": "no"}}', JSON),
        False,
    ),
    "answer over the limit": (lambda: endless(CLOSE_HEAD, total=256 * MiB), False),
    "stream line over the limit": (lambda: endless(SSE_CLOSE_HEAD, total=256 * MiB), True),
}


@pytest.mark.parametrize("failure", FAILING)
async def test_a_failing_node_leaves_no_reference_cycle(b: FakeUpstream, failure: str) -> None:
    """Each failure shape below kept its request (and the partial answer: up to 64 MiB) in a
    reference cycle that only a full collection frees (the stored error's traceback held the
    frames that held the response; a re-raise from a helper held the error)."""
    make, stream = FAILING[failure]
    async with raw_node(make()) as a:
        config = fleet(a.base_url, b, max_response_bytes=MiB)
        config["nodes"] = {"a": config["nodes"]["a"]}  # nothing to fall back to
        async with running_gateway(config) as gw:
            client = gw.client()
            big = [{"role": "user", "content": "x" * 100_000}]
            with contextlib.suppress(openai.APIError):
                await ask(client, stream, messages=big)
            gc.collect()
            gc.disable()
            try:
                for _ in range(3):
                    with contextlib.suppress(openai.APIError):
                        await ask(client, stream, messages=big)
                leftovers = cyclic_garbage_of_spillway()
            finally:
                gc.enable()
    assert leftovers == []


async def test_a_readiness_probe_reads_a_model_list_no_longer_than_a_mebibyte(
    b: FakeUpstream,
) -> None:
    """/readyz needs no key: each poll of a node whose GET /models never ends used to read up
    to the node's max_response_bytes (64 MiB)."""
    async with (
        raw_node(endless(CLOSE_HEAD, total=256 * MiB)) as a,
        running_gateway(fleet(a.base_url, b)) as gw,
        aiohttp.ClientSession() as http,
    ):
        async with http.get(gw.url + "/readyz") as response:
            nodes = (await response.json())["nodes"]
        await asyncio.wait_for(a.ended.wait(), 5)
    assert nodes["a"]["state"] == "down" and nodes["b"]["state"] == "up"
    assert a.sent < 16 * MiB  # 1 MiB read, the rest what the sockets' buffers took


def endless_sse() -> Answer:
    """A well-formed stream with no end in sight: 16 KiB chunks as fast as they are taken."""
    delta = {"index": 0, "delta": {"content": "x" * 16384}, "finish_reason": None}
    event = b"data: " + orjson.dumps({"object": "chat.completion.chunk", "choices": [delta]})
    return endless(SSE_CLOSE_HEAD, total=64 * GiB, piece=event + b"\n\n")


async def test_a_client_that_stops_reading_a_stream_frees_the_node_after_idle_s(
    b: FakeUpstream,
) -> None:
    """Only the node's reads were bounded: a client that read nothing held the node's slot
    (and its connection) for ever, and a few such clients pushed others to the cloud."""
    body = orjson.dumps(
        {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    )
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    request += b"Content-Length: %d\r\n\r\n" % len(body) + body
    async with raw_node(endless_sse()) as a:
        config = fleet(a.base_url, b)
        config["nodes"]["a"]["timeouts"] = {"idle_s": 1.0, "total_s": 600.0}
        async with running_gateway(config) as gw:
            _reader, writer = await asyncio.open_connection(
                "127.0.0.1", int(gw.url.rsplit(":", 1)[1])
            )
            writer.write(request)  # and never read a byte
            await asyncio.sleep(0.5)
            assert gw.in_flight()["a"] == 1
            await until(lambda: gw.in_flight()["a"] == 0, 10)  # about idle_s after it stalled
            writer.close()
        await asyncio.wait_for(a.ended.wait(), 5)
    assert a.cut_off


@pytest.mark.parametrize(
    "first",
    [b"data: upstream auth failed for Bearer " + KEY_A.encode(), b'data: "just a string"'],
    ids=["text", "a-json-string"],
)
async def test_a_stream_that_does_not_begin_with_a_chunk_falls_back(
    b: FakeUpstream, first: bytes
) -> None:
    """Before, the event was relayed raw (the node's key with it), the stream committed to
    the node, and it ended with [DONE] as a success."""
    sse = "Content-Type: text/event-stream\r\n"
    async with (
        raw_node(fixed("200 OK", first + b"\n\ndata: [DONE]\n\n", sse)) as a,
        running_gateway(fleet(a.base_url, b)) as gw,
    ):
        result = await ask(gw.client(), stream=True)
    assert (result.node, result.text) == ("b", "b-0 b-1 b-2 b-3 ")
