"""The listener's connection cap, on both event loops, and its default from ``ulimit -n``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson
import pytest
from aiohttp import web

from spillway.config.schema import ServerConfig
from spillway.server import listener
from spillway.server.listener import (
    FILE_HEADROOM,
    MAX_DEFAULT_CONNECTIONS,
    MIN_DEFAULT_CONNECTIONS,
    connection_limit,
)


@pytest.mark.parametrize(
    ("open_files", "expected"),
    [
        (1024, (1024 - FILE_HEADROOM) // 2),  # 448: each connection may need a node one too
        (65536, MAX_DEFAULT_CONNECTIONS),
        (2**31 - 1, MAX_DEFAULT_CONNECTIONS),  # unlimited
        (160, MIN_DEFAULT_CONNECTIONS),
    ],
)
def test_the_default_cap_leaves_room_for_node_connections_and_files(
    open_files: int, expected: int
) -> None:
    assert connection_limit(ServerConfig(), open_files) == expected


def test_a_configured_cap_wins() -> None:
    assert connection_limit(ServerConfig(max_connections=5), open_files=1024) == 5


@asynccontextmanager
async def capped(limit: int) -> AsyncIterator[tuple[int, asyncio.Event]]:
    """A bare app behind the listener: GET /wait holds its connection until released."""
    release = asyncio.Event()

    async def wait(_request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="done")

    app = web.Application()
    app.router.add_get("/wait", wait)
    runner = await listener.start(app, ServerConfig(port=0, max_connections=limit))
    try:
        yield runner.addresses[0][1], release
    finally:
        release.set()
        await runner.cleanup()


async def opened(port: int, send: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(send)
    await asyncio.sleep(0.05)  # accepted, and what was sent read
    return reader, writer


WAIT = b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.both_loops
async def test_over_the_cap_an_idle_connection_makes_room_and_busy_ones_do_not() -> None:
    async with capped(2) as (port, release):
        # Every writer is kept: a StreamWriter that is garbage-collected closes its socket.
        busy, busy_writer = await opened(port, WAIT)
        idle, idle_writer = await opened(port)
        newer, newer_writer = await opened(port)  # over the cap: takes the idle one's place
        assert await asyncio.wait_for(idle.read(), 1) == b""

        newer_writer.write(WAIT)  # now both open connections are busy
        await asyncio.sleep(0.05)
        refused, refused_writer = await opened(port)
        answer = await asyncio.wait_for(refused.read(), 1)  # answered, then closed
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        envelope = orjson.loads(answer.partition(b"\r\n\r\n")[2])
        assert envelope["error"]["code"] == "too_many_connections"

        release.set()
        for reader in (busy, newer):  # the busy ones were left alone
            assert (await asyncio.wait_for(reader.readline(), 1)).startswith(b"HTTP/1.1 200")
        for writer in (busy_writer, idle_writer, newer_writer, refused_writer):
            writer.close()


@pytest.mark.both_loops
async def test_a_burst_of_connections_does_not_overshoot_the_cap() -> None:
    """asyncio's loop may accept a whole backlog in one iteration, before aiohttp lists any
    of them as connections: the cap counts the ones it made and that are still connecting."""

    async def busy(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(WAIT)
        return reader, writer

    async with capped(10) as (port, _release):
        held = await asyncio.gather(*(busy(port) for _ in range(120)))
        await asyncio.sleep(0.3)
        answers = await asyncio.gather(
            *(asyncio.wait_for(reader.read(20), 0.5) for reader, _ in held),
            return_exceptions=True,
        )
        refused = sum(a == b"HTTP/1.1 503 Service" for a in answers)
        for _reader, writer in held:
            writer.close()
    assert refused == 110  # the 10 admitted are still waiting for their answer


async def answered(reader: asyncio.StreamReader) -> bytes:
    """One whole answer's status line (its headers and body read too)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 1)
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    await reader.readexactly(length)
    return head.split(b"\r\n")[0]


@pytest.mark.both_loops
async def test_a_connection_that_never_sent_a_request_makes_room_first() -> None:
    """Closing a kept-alive connection races its client's next request; a connection that
    never sent one is what a flood is made of, and goes first, however old the other."""
    missing = b"GET /missing HTTP/1.1\r\nHost: x\r\n\r\n"
    async with capped(2) as (port, _release):
        used, used_writer = await opened(port, missing)
        assert (await answered(used)).startswith(b"HTTP/1.1 404")
        await asyncio.sleep(0.05)  # its answer is out: it waits for its next request
        unused, unused_writer = await opened(port)
        _newcomer, newcomer_writer = await opened(port)  # over the cap
        assert await asyncio.wait_for(unused.read(), 1) == b""  # the one never used went
        used_writer.write(missing)
        assert (await answered(used)).startswith(b"HTTP/1.1 404")  # the used one stayed
        for writer in (used_writer, unused_writer, newcomer_writer):
            writer.close()
