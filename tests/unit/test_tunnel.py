"""Talking to a proxy, against a scripted one on a real socket: the CONNECT request and its
credentials, the absolute-form request, and every way a proxy can refuse or misbehave."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from spillway.config.load import validate
from spillway.config.schema import Timeouts
from spillway.errors import UpstreamConnectError, UpstreamTimeout
from spillway.nodes.http import HttpNode
from spillway.nodes.transport import transport_for
from tests.fakes.upstream import closed_port

pytestmark = pytest.mark.both_loops

SECRET = "p@ss-w0rd-secret"
Answer = Callable[[asyncio.StreamWriter], Awaitable[None]]


@dataclass
class FakeProxy:
    port: int = 0
    heads: list[str] = field(default_factory=list)
    answer: Answer | None = None

    def url(self) -> str:
        return f"http://gw:p%40ss-w0rd-secret@127.0.0.1:{self.port}"


@pytest.fixture
async def proxy() -> AsyncIterator[FakeProxy]:
    fake = FakeProxy()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            fake.heads.append(head.decode("latin-1"))
            if b"Content-Length: " in head:
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
            assert fake.answer is not None
            await fake.answer(writer)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    fake.port = server.sockets[0].getsockname()[1]
    yield fake
    server.close()


def says(raw: bytes) -> Answer:
    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(raw)

    return answer


async def silent(writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(5)


def node_via(
    proxy_url: str, base_url: str = "https://api.example.test/v1", **extra: Any
) -> HttpNode:
    raw = {"kind": "cloud", "base_url": base_url, "models": {"m": "m"}, "proxy": proxy_url, **extra}
    spec = validate({"nodes": {"n": raw}}).nodes["n"]
    https = base_url.startswith("https://")
    return HttpNode("n", base_url, transport_for(spec, https=https), 4, max_response_bytes=2**20)


async def failure(client: HttpNode, connect_s: float = 2.0) -> UpstreamConnectError:
    try:
        with pytest.raises(UpstreamConnectError) as caught:
            await client.chat(b"{}", Timeouts(connect_s=connect_s, total_s=5))
        return caught.value
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("status", "words"),
    [
        ("407 Proxy Authentication Required", "HTTP 407 Proxy Authentication Required"),
        ("403 Forbidden", "HTTP 403 Forbidden"),
        ("502 Bad Gateway", "HTTP 502 Bad Gateway"),
    ],
)
async def test_a_refused_connect_names_the_proxys_status_and_nothing_secret(
    proxy: FakeProxy, status: str, words: str
) -> None:
    proxy.answer = says(f"HTTP/1.1 {status}\r\nContent-Length: 2\r\n\r\nno".encode())
    error = await failure(node_via(proxy.url()))
    assert error.message == f"node 'n': cannot connect (proxy refused CONNECT: {words})"
    assert error.delivered is False
    # the node's name is resolved by the proxy, not here; the credentials decoded, as curl does
    basic = base64.b64encode(f"gw:{SECRET}".encode()).decode()
    assert proxy.heads == [
        "CONNECT api.example.test:443 HTTP/1.1\r\nHost: api.example.test:443\r\n"
        f"Proxy-Authorization: Basic {basic}\r\n\r\n"
    ]


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (says(b"SSH-2.0-OpenSSH\r\n\r\n"), "proxy's answer to CONNECT is not HTTP"),
        (says(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 4000), "over 16384 bytes"),
        (says(b"HTTP/1.1 200 OK\r\n"), "proxy closed the connection during CONNECT"),
        (says(b"HTTP/1.1 200 OK\r\n\r\nHTTP/1.1"), "bytes after its answer"),
    ],
)
async def test_a_proxy_out_of_step_is_a_connect_failure(
    proxy: FakeProxy, answer: Answer, words: str
) -> None:
    proxy.answer = answer
    error = await failure(node_via(proxy.url()))
    assert words in error.message and error.delivered is False


async def test_a_silent_proxy_is_bounded_by_connect_s(proxy: FakeProxy) -> None:
    proxy.answer = silent
    client = node_via(proxy.url())
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(UpstreamTimeout) as caught:
        await client.chat(b"{}", Timeouts(connect_s=0.3, total_s=5))
    await client.aclose()
    assert caught.value.phase == "connection" and loop.time() - start < 1.0


async def test_an_unreachable_proxy_says_so() -> None:
    error = await failure(node_via(f"http://127.0.0.1:{closed_port()}"))
    assert error.message == "node 'n': cannot connect (proxy: ConnectionRefusedError)"


async def test_an_http_node_through_a_proxy_gets_absolute_form_and_credentials(
    proxy: FakeProxy,
) -> None:
    body = b'{"id":"x","choices":[]}'
    proxy.answer = says(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    client = node_via(proxy.url(), "http://10.9.8.7:8000/v1", api_key="sk-node-0123456789")
    reply = await client.chat(b"{}", Timeouts(connect_s=2, total_s=5))
    await client.aclose()
    assert reply.data == {"id": "x", "choices": []}
    lines = proxy.heads[0].split("\r\n")
    assert lines[0] == "POST http://10.9.8.7:8000/v1/chat/completions HTTP/1.1"
    basic = base64.b64encode(f"gw:{SECRET}".encode()).decode()
    assert "Host: 10.9.8.7:8000" in lines
    assert f"Proxy-Authorization: Basic {basic}" in lines
    assert "Authorization: Bearer sk-node-0123456789" in lines
