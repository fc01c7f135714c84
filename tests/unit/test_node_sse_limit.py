"""A node streaming one endless SSE line fails as a node, once the line passes the limit."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from spillway.config.schema import Timeouts
from spillway.errors import UpstreamError
from spillway.nodes.http import HttpNode
from spillway.wire.sse import MAX_EVENT_BYTES

MiB = 1024 * 1024


class EndlessLine:
    """Answers a stream with ``data: xxxx…`` and never a line end, up to 64 MiB, and notes
    how much it sent before the client hung up."""

    def __init__(self) -> None:
        self.sent = 0
        self.done = asyncio.Event()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._answer(reader, writer)
        finally:
            self.done.set()
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: ")
        with contextlib.suppress(ConnectionError):
            while self.sent < 64 * MiB:
                writer.write(b"x" * 65536)
                await writer.drain()
                self.sent += 65536


async def test_an_endless_sse_line_is_a_node_failure_not_a_stuck_core() -> None:
    """Before, the decoder kept the whole line, re-splitting it on every read: 20 s of CPU for
    one stream, and no error until the node stopped. Now the stream fails as soon as the
    line passes MAX_EVENT_BYTES, as an UpstreamError (the router may fall back), and the
    connection is dropped, so the node stops sending."""
    upstream = EndlessLine()
    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    node = HttpNode("n", f"http://127.0.0.1:{port}/v1", None, 2, max_response_bytes=64 * MiB)
    stream = node.stream(b"{}", Timeouts(first_token_s=10, total_s=20))
    with pytest.raises(UpstreamError, match="SSE line or event larger than") as caught:
        async for _event in stream:
            pytest.fail("an endless line has no event")
    assert caught.value.node == "n"
    assert caught.value.may_fall_back
    await asyncio.wait_for(upstream.done.wait(), 5)
    assert upstream.sent < MAX_EVENT_BYTES + 16 * MiB  # what the kernel's buffers took
    await node.aclose()
    server.close()
