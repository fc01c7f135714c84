"""Clients that send what no SDK would: each gets a clear 4xx in the OpenAI envelope, the
gateway logs no traceback, and nothing oversized is echoed or kept.

Raw requests go over real sockets (a stalled body, bytes that are not UTF-8 in a header, a
body that is not the gzip it claims to be); normal ones through the openai SDK.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from spillway.wire.requests import MAX_MODEL_CHARS, MAX_NESTING
from tests.fakes.gateway import RunningGateway, node, running_gateway
from tests.fakes.upstream import FakeUpstream
from tests.faults.test_ledger import ledger_rows

KEY = "hostile-test-key-123456"
BODY = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = await FakeUpstream("llm").start()
    yield fake
    await fake.stop()


def config(upstream: FakeUpstream, data_dir: Path, **server: Any) -> dict[str, Any]:
    return {
        "server": {"data_dir": str(data_dir), **server},
        "nodes": {"llm": node("private", upstream.base_url)},
        "keys": [{"key": KEY, "tenant": "t"}],
    }


def port_of(gw: RunningGateway) -> int:
    return int(gw.url.rsplit(":", 1)[1])


def post(
    body: bytes, *headers: bytes, key: bytes = KEY.encode(), length: int | None = None
) -> bytes:
    head = [
        b"POST /v1/chat/completions HTTP/1.1",
        b"Host: gateway",
        b"Authorization: Bearer " + key,
        b"Content-Type: application/json",
        b"Content-Length: %d" % (len(body) if length is None else length),
        *headers,
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


async def answer_then_eof(port: int, request: bytes, within_s: float = 5.0) -> tuple[int, Any]:
    """Send ``request``, read until the gateway closes the connection (which must happen
    within ``within_s``); the status and the JSON body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    async with asyncio.timeout(within_s):
        raw = await reader.read()  # to EOF: the gateway closed the connection
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), orjson.loads(body)


def assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert bad == [], [r.getMessage() for r in bad]


def assert_envelope(body: Any, error_type: str) -> dict[str, Any]:
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == error_type
    return error


async def test_a_key_that_is_not_utf8_gets_401_not_500(upstream, tmp_path, caplog):
    """Before: UnicodeEncodeError while hashing the key, a 500 and a traceback."""
    async with running_gateway(config(upstream, tmp_path)) as gw:
        request = post(BODY, b"Connection: close", key=b"\xff\xfe-not-utf8")
        status, body = await answer_then_eof(port_of(gw), request)
    assert status == 401
    error = assert_envelope(body, "authentication_error")
    assert "not valid UTF-8" in error["message"]
    assert upstream.calls == 0
    assert_no_traceback(caplog)


@pytest.mark.parametrize("depth", [MAX_NESTING + 1, 300, 1000])
async def test_json_nested_too_deep_gets_400_not_500(upstream, tmp_path, caplog, depth):
    """Before, 255 to 1,023 levels: orjson parsed the body, could not write it for the node,
    and the client got a 500 with a traceback in the log."""
    deep = b"[" * (depth - 1) + b"]" * (depth - 1)
    raw = BODY[:-1] + b', "extra": ' + deep + b"}"
    async with running_gateway(config(upstream, tmp_path)) as gw:
        status, body = await answer_then_eof(port_of(gw), post(raw, b"Connection: close"))
    assert status == 400
    error = assert_envelope(body, "invalid_request_error")
    assert f"more than {MAX_NESTING} levels" in error["message"]
    assert upstream.calls == 0
    assert_no_traceback(caplog)


async def test_a_body_that_is_not_the_gzip_it_claims_gets_400_not_500(upstream, tmp_path, caplog):
    """Before: aiohttp's decoding error reached the handler (500, a traceback), and again
    when aiohttp drained the body afterwards (a second traceback)."""
    async with running_gateway(config(upstream, tmp_path)) as gw:
        request = post(BODY, b"Content-Encoding: gzip")  # a plain body, kept alive
        status, body = await answer_then_eof(port_of(gw), request, within_s=2)
        # A body that really is gzip still works.
        packed = post(gzip.compress(BODY), b"Content-Encoding: gzip", b"Connection: close")
        good_status, _ = await answer_then_eof(port_of(gw), packed)
    assert status == 400
    error = assert_envelope(body, "invalid_request_error")
    assert error["code"] == "invalid_body_encoding"
    assert "not valid gzip" in error["message"]
    assert good_status == 200
    assert upstream.calls == 1
    assert_no_traceback(caplog)


async def test_a_stalled_body_gets_408_and_the_connection_is_closed(upstream, tmp_path, caplog):
    """Before: a keyed client that sent half its body and then nothing held the connection
    (and its handler) for as long as it liked."""
    async with running_gateway(config(upstream, tmp_path, body_timeout_s=0.3)) as gw:
        started = time.monotonic()
        half = post(BODY[:20], length=len(BODY))  # keep-alive, and the rest never comes
        status, body = await answer_then_eof(port_of(gw), half, within_s=3)
        took = time.monotonic() - started
    assert status == 408
    error = assert_envelope(body, "invalid_request_error")
    assert error["code"] == "body_timeout"
    assert "0.3 s" in error["message"] and "body_timeout_s" in error["message"]
    assert 0.3 <= took < 2  # closed at once, not after aiohttp's 10 s of draining
    assert upstream.calls == 0
    assert_no_traceback(caplog)


async def test_a_slow_but_steady_body_within_the_timeout_is_served(upstream, tmp_path):
    async with running_gateway(config(upstream, tmp_path, body_timeout_s=2)) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw))
        request = post(BODY, b"Connection: close")
        for i in range(0, len(request), 16):
            writer.write(request[i : i + 16])
            await asyncio.sleep(0.01)
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert raw.startswith(b"HTTP/1.1 200")


async def test_an_oversized_model_name_is_refused_not_echoed_and_not_stored(upstream, tmp_path):
    """Before: five 1 MB model names added 4 MB to the ledger, and each was echoed whole in
    its 404."""
    name = "m" * 1_000_000
    async with running_gateway(config(upstream, tmp_path)) as gw:
        client = gw.client(KEY)
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model=name, messages=[{"role": "user"}])
        with pytest.raises(openai.BadRequestError):
            await client.embeddings.create(model=name, input="x")
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.chat.completions.create(
                model="x" * MAX_MODEL_CHARS, messages=[{"role": "user"}]
            )
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["param"] == "model"
    assert f"at most {MAX_MODEL_CHARS}" in error["message"]
    assert len(caught.value.response.content) < 500
    assert len(unknown.value.response.content) < MAX_MODEL_CHARS + 500
    rows = await ledger_rows(tmp_path)
    assert len(rows) == 3
    assert max(len(row.model) for row in rows) <= MAX_MODEL_CHARS


async def test_an_unknown_path_is_quoted_short(upstream, tmp_path):
    async with running_gateway(config(upstream, tmp_path)) as gw:
        request = (
            b"GET /" + b"p" * 7000 + b" HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n"
        )
        status, body = await answer_then_eof(port_of(gw), request)
    assert status == 404
    message = assert_envelope(body, "invalid_request_error")["message"]
    assert len(message) < 200 and "pppp…" in message
