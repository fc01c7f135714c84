"""The shared state's Redis client (state/resp.py) against a real redis-server: replies of
every RESP type, with hiredis's parser and with the pure-Python one, overlapping calls, a
caller that gives up, a server that goes away and comes back, a password and a db, and
scripts loaded on first NOSCRIPT."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from spillway.state import resp
from spillway.state.resp import ReplyError, RespClient
from tests.redis_server import RedisServer, redis_server

PASSWORD = "resp-secret-91d2"
#: spillway serve runs on uvloop, whose transports differ from asyncio's
pytestmark = pytest.mark.both_loops


@pytest.fixture(params=["hiredis", "python"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "python":
        monkeypatch.setattr(resp, "hiredis", None)
    elif resp.hiredis is None:
        pytest.skip("hiredis is not installed")
    return str(request.param)


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with redis_server(password=PASSWORD) as s:
        yield s


@pytest.fixture
async def client(server: RedisServer, parser: str) -> AsyncIterator[RespClient]:
    c = RespClient(f"redis://:{PASSWORD}@{server.host}:{server.port}/3")
    yield c
    await c.aclose()


async def test_every_reply_type(client: RespClient) -> None:
    assert await client.execute("SET", "k", "v") == b"OK"
    assert await client.execute("GET", "k") == b"v"
    assert await client.execute("GET", "missing") is None
    assert await client.execute("INCRBY", "n", 5) == 5
    assert await client.execute("RPUSH", "l", "a", b"\r\n", "") == 3
    assert await client.execute("LRANGE", "l", 0, -1) == [b"a", b"\r\n", b""]
    with pytest.raises(ReplyError, match="WRONGTYPE"):
        await client.execute("INCR", "l")
    assert await client.execute("CLIENT", "INFO") and (await client.execute("PING")) == b"PONG"


async def test_the_url_selects_the_db(client: RespClient, server: RedisServer) -> None:
    await client.execute("SET", "where", "db3")
    other = RespClient(f"redis://:{PASSWORD}@{server.host}:{server.port}/0")
    try:
        assert await other.execute("GET", "where") is None
    finally:
        await other.aclose()


async def test_a_wrong_password_is_an_error_reply(server: RedisServer, parser: str) -> None:
    wrong = RespClient(f"redis://:nope@{server.host}:{server.port}/0")
    with pytest.raises(ReplyError):
        await wrong.execute("PING")
    await wrong.aclose()


async def test_overlapping_calls_each_get_their_own_reply(client: RespClient) -> None:
    replies = await asyncio.gather(*(client.execute("ECHO", str(i)) for i in range(500)))
    assert replies == [str(i).encode() for i in range(500)]
    many = await client.execute_many([("SET", "a", 1), ("INCR", "a"), ("GET", "a")])
    assert many == [b"OK", 2, b"2"]


async def test_a_caller_that_gives_up_disturbs_no_other_call(client: RespClient) -> None:
    """A client that went away cancels its call: its reply is dropped when it comes, and the
    calls around it keep their replies and their connection."""
    await client.execute("PING")
    connection = client._conn
    calls = [asyncio.ensure_future(client.execute("ECHO", str(i))) for i in range(50)]
    calls[10].cancel()
    replies = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(replies[10], asyncio.CancelledError)
    assert [r for i, r in enumerate(replies) if i != 10] == [
        str(i).encode() for i in range(50) if i != 10
    ]
    assert client._conn is connection and await client.execute("ECHO", "x") == b"x"


async def test_reset_after_a_timeout_starts_a_new_connection(client: RespClient) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await client.execute("BLPOP", "never", 2)  # would answer after 2 s
    client.reset()  # what SharedState does after a timeout
    started = asyncio.get_running_loop().time()
    assert await client.execute("ECHO", "next") == b"next"
    assert asyncio.get_running_loop().time() - started < 0.5  # not queued behind the BLPOP


async def test_a_server_that_went_away_fails_the_call_and_is_reconnected(
    client: RespClient, server: RedisServer
) -> None:
    assert await client.execute("PING") == b"PONG"
    server.stop()
    with pytest.raises(OSError):
        await client.execute("PING")
    server.start()
    assert await client.execute("PING") == b"PONG"


async def test_scripts_load_themselves_on_noscript(client: RespClient) -> None:
    script = client.register_script("return {KEYS[1], ARGV[1], tonumber(ARGV[2]) + 1}")
    await client.execute("SCRIPT", "FLUSH")
    assert await script(keys=["k"], args=["a", 41]) == [b"k", b"a", 42]
    assert await script(keys=["k"], args=["b", 1.5]) == [b"k", b"b", 2]  # Lua number → int
