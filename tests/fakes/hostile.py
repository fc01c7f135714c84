"""A node that answers with the raw bytes a test scripts: hostile or broken HTTP that no web
framework would send (a 10 GiB Content-Length, a gzip bomb, a 200 that is an HTML page).

It answers every request on a connection in turn, keeps the connection open afterwards, and
records how much of an endless body it got to send before the client hung up.
"""

from __future__ import annotations

import asyncio
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

MiB = 1024 * 1024
GiB = 1024 * MiB

Answer = Callable[[asyncio.StreamWriter, "RawNode"], Awaitable[None]]


@dataclass
class RawNode:
    answer: Answer
    port: int = 0
    heads: list[bytes] = field(default_factory=list)  # each request's line and headers
    sent: int = 0  # body bytes written by an ``endless`` answer
    cut_off: bool = False  # the client hung up before an ``endless`` answer was all sent
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # an ``endless`` one ended

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@asynccontextmanager
async def raw_node(answer: Answer) -> AsyncIterator[RawNode]:
    node = RawNode(answer)
    handlers: dict[asyncio.StreamWriter, asyncio.Task[None] | None] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers[writer] = asyncio.current_task()
        try:
            while (request := await read_request(reader)) is not None:
                node.heads.append(request[0])
                await node.answer(writer, node)
        except ConnectionError:
            pass
        finally:
            writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    node.port = listener.sockets[0].getsockname()[1]
    try:
        yield node
    finally:
        listener.close()
        for writer in handlers:  # connections still open go with the node
            writer.close()
        await asyncio.gather(*(t for t in handlers.values() if t is not None))


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """The next request's head and body, or None once the client has gone."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


def fixed(status: str, body: bytes, headers: str = "") -> Answer:
    """One whole answer with a correct Content-Length."""

    async def answer(writer: asyncio.StreamWriter, node: RawNode) -> None:
        writer.write(
            f"HTTP/1.1 {status}\r\n{headers}Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        await writer.drain()

    return answer


def endless(head: str, total: int, piece: bytes = b"x" * (64 * 1024)) -> Answer:
    """``head`` as given (the status line, the headers, the blank line), then ``piece`` over
    and over until ``total`` bytes of body are sent or the client hangs up."""

    async def answer(writer: asyncio.StreamWriter, node: RawNode) -> None:
        writer.write(head.encode())
        try:
            while node.sent < total:
                writer.write(piece)
                await writer.drain()
                node.sent += len(piece)
        except ConnectionError:
            node.cut_off = True
        finally:
            node.ended.set()

    return answer


def gzip_bomb(inflated_mib: int) -> bytes:
    """A valid gzip body of ``inflated_mib`` MiB of zeros, about 1 KiB on the wire per MiB.
    Built from one compressed MiB repeated: after a full flush each MiB of zeros compresses
    to the same bytes, so a 1 GiB bomb takes milliseconds to make, not seconds."""
    zeros = bytes(MiB)
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 16 + 15: with a gzip header
    first = packer.compress(zeros) + packer.flush(zlib.Z_FULL_FLUSH)
    again = packer.compress(zeros) + packer.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(inflated_mib):
        crc = zlib.crc32(zeros, crc)
    last_block = b"\x03\x00"  # an empty final block with fixed codes
    trailer = struct.pack("<II", crc, (inflated_mib * MiB) & 0xFFFFFFFF)
    return first + again * (inflated_mib - 1) + last_block + trailer
