"""A POST that may have reached a node is never sent to it again by the client's pool.

The node here reads each request in full, then answers the first and drops the connection
under the second, as a node that crashes or restarts mid-generation does. Before, the pool
sent the second again on a fresh connection (it had failed within 0.5 s of the write on a
kept-alive connection), and a node that had taken it would have generated twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import openai
import orjson
import pytest

from tests.fakes.gateway import node, running_gateway
from tests.fakes.upstream import FakeUpstream
from tests.faults.test_failover import FAST, MESSAGES, ask, both_modes

ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "private-model",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"},
             "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
)  # fmt: skip


@dataclass
class DroppingNode:
    """Answers its first chat request; reads every later one whole, then hangs up."""

    port: int = 0
    chats: list[int] = field(default_factory=list)  # the connection each chat came on

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@pytest.fixture
async def dropping() -> AsyncIterator[DroppingNode]:
    state = DroppingNode()
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        conn = connections
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)  # the node has the whole request
                state.chats.append(conn)
                if len(state.chats) > 1:
                    return  # a crash mid-generation: the connection closes, no answer
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(ANSWER) + ANSWER
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    yield state
    server.close()


@pytest.fixture
async def cloud() -> AsyncIterator[FakeUpstream]:
    fake = await FakeUpstream("cloud").start()
    yield fake
    await fake.stop()


@both_modes
async def test_the_node_gets_one_copy_and_the_request_fails_over(
    dropping: DroppingNode, cloud: FakeUpstream, stream: bool
) -> None:
    raw = {
        "timeouts": FAST,
        "nodes": {
            "gpu": node("private", dropping.base_url),
            "cloud": node("cloud", cloud.base_url),
        },
    }
    async with running_gateway(raw) as gw:
        assert (await ask(gw.client(), stream=False)).node == "gpu"  # keeps its connection
        assert (await ask(gw.client(), stream=stream)).node == "cloud"
    assert dropping.chats == [1, 1]  # the second request reached the node exactly once
    assert cloud.calls == 1


async def test_with_nowhere_to_fail_over_the_client_gets_a_502_not_a_second_copy(
    dropping: DroppingNode,
) -> None:
    raw = {
        "timeouts": FAST,
        "routing": {"max_attempts": 1},
        "nodes": {"gpu": node("private", dropping.base_url)},
    }
    async with running_gateway(raw) as gw:
        await ask(gw.client(), stream=False)
        with pytest.raises(openai.APIStatusError) as caught:
            await gw.client().chat.completions.create(model="m", messages=MESSAGES)
    assert caught.value.status_code == 502
    assert "connection closed by the node" in caught.value.response.text
    assert dropping.chats == [1, 1]
