"""The listener ``spillway serve`` runs (``server/listener.py``), on real sockets: idle
connections beyond ``server.max_connections`` make room for new ones instead of starving
them, a newcomer is refused only when every connection is busy, and idle connections close
after ``server.keepalive_timeout_s``.
"""

from __future__ import annotations

import asyncio
import resource
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from aiohttp import web

from spillway.config.load import validate
from spillway.nodes.managed import free_loopback_port
from spillway.server import listener
from spillway.server.app import build_app
from tests.fakes.gateway import node
from tests.fakes.upstream import FakeUpstream

KEY = "cap-test-key-123456"
MESSAGES: Any = [{"role": "user", "content": "hello"}]
BODY = orjson.dumps({"model": "m", "messages": MESSAGES})


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = await FakeUpstream("llm").start()
    yield fake
    await fake.stop()


@asynccontextmanager
async def serving(
    upstream: FakeUpstream, **server: Any
) -> AsyncIterator[tuple[int, web.AppRunner]]:
    """The gateway behind the production listener, on a free port."""
    with tempfile.TemporaryDirectory(prefix="spillway-test-") as scratch:
        config = validate(
            {
                "server": {"data_dir": scratch, "port": 0, **server},
                "nodes": {"llm": node("private", upstream.base_url)},
                "keys": [{"key": KEY, "tenant": "t"}],
            }
        )
        runner = await listener.start(build_app(config), config.server)
        try:
            yield runner.addresses[0][1], runner
        finally:
            await runner.cleanup()


def client(port: int) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)


async def connect(
    port: int, send: bytes = b""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if send:
        writer.write(send)
    for _ in range(3):  # let the gateway, on this same loop, accept it and read what came
        await asyncio.sleep(0)
    return reader, writer


async def closed_by_gateway(reader: asyncio.StreamReader, within_s: float) -> bool:
    try:
        async with asyncio.timeout(within_s):
            return await reader.read() == b""
    except TimeoutError:
        return False


async def test_idle_connections_beyond_the_cap_do_not_keep_a_keyed_client_out(upstream):
    """Before: with ``ulimit -n 1024``, 1,100 idle unauthenticated connections made a keyed
    client's request fail. Here the cap is 20 and 40 idle connections come first: half sent
    nothing, half the start of a request head. The oldest idle ones are closed to make room,
    and the keyed request is served."""
    async with serving(upstream, max_connections=20) as (port, runner):
        idle = []
        for i in range(40):
            partial = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" if i % 2 else b""
            idle.append(await connect(port, partial))
        await asyncio.sleep(0.05)
        assert runner.server is not None
        assert len(runner.server.connections) <= 20

        reply = await client(port).chat.completions.create(model="m", messages=MESSAGES)
        assert reply.choices[0].message.content

        closed = [await closed_by_gateway(reader, 0.5) for reader, _ in idle[:20]]
        assert all(closed)  # the 20 oldest made room for the 20 newer ones
        for _, writer in idle:
            writer.close()


async def test_a_newcomer_is_refused_with_503_only_when_every_connection_is_busy(upstream):
    """Connections with a request in flight are never closed for a newcomer; the newcomer
    gets a 503 in the OpenAI envelope, at once, and a request after they finish is served."""
    async with serving(upstream, max_connections=3, body_timeout_s=10) as (port, _runner):
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + KEY.encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % len(BODY)
        )
        busy = [await connect(port, head + BODY[:10]) for _ in range(3)]
        await asyncio.sleep(0.05)  # each handler now waits for the rest of its body

        reader, _writer = await connect(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(2):
            raw = await reader.read()
        status_line, _, rest = raw.partition(b"\r\n")
        assert status_line == b"HTTP/1.1 503 Service Unavailable"
        error = orjson.loads(rest.partition(b"\r\n\r\n")[2])["error"]
        assert error["code"] == "too_many_connections"
        assert "max_connections" in error["message"]

        for reader, writer in busy:  # the busy ones were left alone, and finish
            writer.write(BODY[10:])
            await writer.drain()
            assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
        reply = await client(port).chat.completions.create(model="m", messages=MESSAGES)
        assert reply.choices[0].message.content  # an idle kept-alive one made room
        for _, writer in busy:
            writer.close()


@pytest.mark.parametrize(
    "sent",
    [b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"],
    ids=["nothing", "half a head"],
)
async def test_a_connection_without_a_whole_request_head_is_closed_after_the_timeout(
    upstream, sent
):
    """Before, aiohttp's default held such a connection for an hour (3,630 s)."""
    async with serving(upstream, keepalive_timeout_s=0.3) as (port, _runner):
        reader, writer = await connect(port, sent)
        assert not await closed_by_gateway(reader, 0.15)
        assert await closed_by_gateway(reader, 2)
        writer.close()


async def test_a_kept_alive_connection_is_closed_after_the_timeout(upstream):
    async with serving(upstream, keepalive_timeout_s=0.3) as (port, _runner):
        reader, writer = await connect(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
        await reader.readuntil(b"}")  # the rest of the answer
        assert await closed_by_gateway(reader, 2)
        writer.close()


def _low_file_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FILE_LIMIT, FILE_LIMIT))


FILE_LIMIT = 256


async def test_spillway_serve_under_a_low_ulimit_still_serves_a_keyed_client(upstream, tmp_path):
    """The attack as it was run, on ``spillway serve`` itself (uvloop and all) with
    ``ulimit -n 256``: 300 idle connections, then a keyed request. Before, the gateway ran
    out of descriptors, could accept nothing more, and the keyed request failed. Now the
    default cap, (256 - 128) / 2 = 64, keeps descriptors free and idle connections make room."""
    port = free_loopback_port()
    (tmp_path / "spillway.toml").write_text(
        f"""
[server]
port = {port}
data_dir = "{tmp_path / "data"}"

[nodes.llm]
kind = "private"
base_url = "{upstream.base_url}"
models = {{ m = "private-model" }}

[[keys]]
key = "{KEY}"
tenant = "t"
"""
    )
    spillway = Path(sys.executable).with_name("spillway")
    log = tmp_path / "serve.log"
    proc = await asyncio.create_subprocess_exec(
        str(spillway), "serve", "--config", str(tmp_path / "spillway.toml"),
        stdout=log.open("wb"), stderr=asyncio.subprocess.STDOUT, preexec_fn=_low_file_limit,
    )  # fmt: skip
    idle: list[asyncio.StreamWriter] = []
    try:
        async with httpx.AsyncClient() as http:
            async with asyncio.timeout(30):
                while True:
                    try:
                        if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        await asyncio.sleep(0.1)
        for _ in range(300):
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            idle.append(writer)
        await asyncio.sleep(0.5)  # the gateway accepts them all (closing the oldest idle)
        async with asyncio.timeout(10):
            reply = await client(port).chat.completions.create(model="m", messages=MESSAGES)
        assert reply.choices[0].message.content
    finally:
        for writer in idle:
            writer.close()
        proc.terminate()
        await proc.wait()
    text = log.read_text()
    assert "at most 64 client connections" in text
    assert "Too many open files" not in text and "Traceback" not in text


async def test_keyless_requests_with_unsent_bodies_cannot_hold_the_connections(upstream):
    """Each sends a head with Content-Length and no body, and no key: refused with 401 at
    once. aiohttp then read on for the body for 10 s, the connection counted as busy, and
    twenty such connections kept a keyed client out under a cap of 20."""
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    async with serving(upstream, max_connections=20) as (port, _runner):
        attackers = [await connect(port, head) for _ in range(20)]
        for reader, _ in attackers:  # each got its 401, then the gateway hung up
            answer = await asyncio.wait_for(reader.read(), 2)
            assert answer.startswith(b"HTTP/1.1 401 ")
        reply = await client(port).chat.completions.create(model="m", messages=MESSAGES)
        assert reply.choices
        for _, writer in attackers:
            writer.close()
