"""A CONNECT tunnel through an HTTP forward proxy, for an https:// node behind it.

The pool opens a TCP connection to the proxy, this module asks for ``CONNECT host:port``
(with ``Proxy-Authorization`` when the proxy URL has credentials) and reads the proxy's
answer, and the pool then speaks TLS to the node over the same socket. The caller's connect
timeout bounds all of it. A refusal names the proxy's status, never its credentials or
address, and counts as a connection never made: the node saw nothing.
"""

from __future__ import annotations

import asyncio
import re
import socket
from http import HTTPStatus

from spillway.nodes.h1 import ConnectFailed
from spillway.nodes.transport import Proxy

#: The most bytes of the proxy's answer to CONNECT that are read; it takes a few dozen.
MAX_ANSWER_BYTES = 16 * 1024
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})")


class ProxyRefused(ConnectFailed):
    """The proxy answered CONNECT with something other than 2xx (407, 403, 502…)."""

    def __init__(self, status: int) -> None:
        try:
            phrase = f" {HTTPStatus(status).phrase}"
        except ValueError:
            phrase = ""
        super().__init__(f"proxy refused CONNECT: HTTP {status}{phrase}")
        self.status = status


async def open_tunnel(sock: socket.socket, proxy: Proxy, host: str, port: int) -> None:
    """Ask the proxy at the other end of ``sock`` for a tunnel to ``host:port``."""
    loop = asyncio.get_running_loop()
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
    if proxy.authorization is not None:
        head += f"Proxy-Authorization: {proxy.authorization}\r\n"
    await loop.sock_sendall(sock, (head + "\r\n").encode("latin-1"))
    status = _status(await _read_head(loop, sock))
    if not 200 <= status < 300:
        raise ProxyRefused(status)


async def _read_head(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """The proxy's answer up to its blank line. Nothing may follow it: the node speaks only
    after our TLS hello, so bytes beyond it would be the proxy out of step."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = await loop.sock_recv(sock, 4096)
        if not chunk:
            raise ConnectFailed("proxy closed the connection during CONNECT")
        answer += chunk
        if len(answer) > MAX_ANSWER_BYTES:
            raise ConnectFailed(f"proxy's answer to CONNECT over {MAX_ANSWER_BYTES} bytes")
    head, _, rest = answer.partition(b"\r\n\r\n")
    if rest and _status(head) // 100 == 2:
        raise ConnectFailed("proxy sent bytes after its answer to CONNECT")
    return head


def _status(head: bytes) -> int:
    match = _STATUS_LINE.match(head)
    if match is None:
        raise ConnectFailed("proxy's answer to CONNECT is not HTTP")
    return int(match.group(1))
