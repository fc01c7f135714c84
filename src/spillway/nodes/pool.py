"""A keep-alive pool of HTTP/1.1 connections to one node (see ``spillway.nodes.h1``)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from collections.abc import Mapping

import aiohappyeyeballs
from yarl import URL

from spillway.nodes.h1 import ConnectFailed, Connection, ConnectionBroke, ConnectTimedOut, Response

#: A connection that fails this soon after a request was written to it, before any answer,
#: was closed under the request: a kept-alive one the node had closed (idle timeout,
#: restart), or a new one the node accepted while going down. The node cannot have taken
#: the request: on a kept-alive connection it is sent again on a fresh one, and either way
#: the failure counts as never delivered. Later than this, the node may have been working
#: on it (a generation sends nothing until it ends): never resent, and delivered.
STALE_WITHIN_S = 0.5


async def _send(conn: Connection, data: bytes, max_body: int) -> Response:
    """``conn.exchange``, marking a failure that came with no answer within STALE_WITHIN_S."""
    loop = asyncio.get_running_loop()
    sent = loop.time()
    try:
        return await conn.exchange(data, max_body)
    except ConnectionBroke as exc:
        exc.refused = not exc.answered and loop.time() - sent <= STALE_WITHIN_S
        raise


class Pool:
    """Kept-alive connections to one node (``base_url`` such as ``http://10.0.0.5:8000/v1``).

    At most ``max_connections`` are open; a request beyond that waits for one, within its
    connect timeout. Idle connections are reused newest first and closed after ``idle_s``.
    ``headers`` go on every request (the node's key among them: never logged here). An
    answer may hold at most ``max_body_bytes`` of body at once (``h1.Response``).
    """

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str],
        max_connections: int,
        max_body_bytes: int,
        idle_s: float = 15.0,
    ) -> None:
        url = URL(base_url)
        if url.scheme not in ("http", "https") or not url.raw_host:
            raise ValueError(f"node URL must be http(s)://host[:port]/path, not {url.scheme}://")
        if url.raw_user or url.raw_password or url.raw_query_string or url.raw_fragment:
            raise ValueError("node URL must not carry user:password@, a ?query or a #fragment")
        self._host = url.raw_host
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self._prefix = url.raw_path.rstrip("/")
        fixed = {
            "Host": url.host_port_subcomponent or self._host,
            "User-Agent": "spillway",
            "Accept-Encoding": "identity",
            **headers,
        }
        if any(c in item for pair in fixed.items() for item in pair for c in "\r\n"):
            raise ValueError("a node header name or value contains a line break")
        try:  # encoded once; the message never echoes the value (it may be the node's key)
            self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed.items()).encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(
                "a node header has characters HTTP cannot carry (not latin-1): look for pasted"
                " non-ASCII characters (such as … or curly quotes) in the node's api_key"
            ) from None
        self._limit = max_connections
        self._max_body = max_body_bytes
        self._idle_s = idle_s
        self._open = 0
        self._idle: deque[Connection] = deque()
        self._waiters: deque[asyncio.Future[Connection | None]] = deque()
        self._all: set[Connection] = set()
        self._closed = False

    async def request(
        self, method: str, path: str, body: bytes | None, *, connect_timeout_s: float
    ) -> Response:
        """Send one request; return once the answer's status and headers are in."""
        data = self._encode(method, path, body)
        conn = await self._acquire(connect_timeout_s)
        try:
            return await _send(conn, data, self._max_body)
        except ConnectionBroke as exc:
            if not (conn.used and exc.refused):
                raise
        # The kept-alive connection had gone stale: once more on a fresh one.
        fresh = await self._acquire(connect_timeout_s, fresh=True)
        return await _send(fresh, data, self._max_body)

    async def aclose(self) -> None:
        self._closed = True
        for conn in list(self._all):
            conn.close()
        self._idle.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectFailed("the node's client is closed"))

    def _encode(self, method: str, path: str, body: bytes | None) -> bytes:
        head = f"{method} {self._prefix}{path} HTTP/1.1\r\n".encode("latin-1") + self._fixed
        if body is None:
            return head + b"\r\n"
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body

    async def _acquire(self, timeout_s: float, *, fresh: bool = False) -> Connection:
        """An idle connection (unless ``fresh``), a new one, or the next one released."""
        conn = None if fresh else self._take_idle()
        if conn is not None:
            return conn
        if self._open < self._limit:
            self._open += 1
            return await self._connect(timeout_s)
        waiter: asyncio.Future[Connection | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                handed = await waiter
        except BaseException as exc:
            self._return_unclaimed(waiter)
            if isinstance(exc, TimeoutError):
                raise ConnectTimedOut("every connection to the node stayed busy") from None
            raise
        if handed is not None and fresh:  # take over its slot, but not the socket
            handed.counted = False
            self._all.discard(handed)
            handed.close()
            handed = None
        return handed if handed is not None else await self._connect(timeout_s)

    def _return_unclaimed(self, waiter: asyncio.Future[Connection | None]) -> None:
        """A waiter gave up: a connection (or slot) handed to it in the meantime goes on."""
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            handed = waiter.result()
            if handed is not None:
                self.release(handed)
            else:
                self._slot_freed()  # the slot reserved for this waiter
        elif waiter in self._waiters:
            self._waiters.remove(waiter)

    async def _connect(self, timeout_s: float) -> Connection:
        """A new connection in a slot already counted in ``_open`` (freed if this fails)."""
        made = Connection(self)  # holds that slot until discounted, exactly once
        if self._closed:
            made.close()
            raise ConnectFailed("the node's client is closed")
        try:
            async with asyncio.timeout(timeout_s):
                await self._open_socket(made)
        except BaseException as exc:
            made.close()  # a transport made before a cancellation is closed too
            if isinstance(exc, TimeoutError):
                raise ConnectTimedOut(f"no connection within {timeout_s:g} s") from None
            if isinstance(exc, OSError):  # refused, unreachable, DNS, TLS (SSLError is one)
                raise ConnectFailed(type(exc).__name__) from None
            raise
        self._all.add(made)
        return made

    async def _open_socket(self, made: Connection) -> None:
        """Happy eyeballs (RFC 8305) over the node's addresses, as aiohttp's connector does:
        with a dead IPv6 route, IPv4 is tried after 0.25 s instead of after the timeout."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
        sock = await aiohappyeyeballs.start_connection(infos, happy_eyeballs_delay=0.25)
        hostname = self._host if self._ssl is not None else None
        try:
            await loop.create_connection(
                lambda: made, sock=sock, ssl=self._ssl, server_hostname=hostname
            )
        except BaseException:
            sock.close()
            raise

    def _take_idle(self) -> Connection | None:
        if not self._idle:
            return None
        expired = asyncio.get_running_loop().time() - self._idle_s
        while self._idle and self._idle[0].idle_since < expired:
            self._idle.popleft().close()
        while self._idle:
            conn = self._idle.pop()
            if conn.usable:
                return conn
            conn.close()
        return None

    def release(self, conn: Connection) -> None:
        """A connection finished an exchange and may carry another."""
        conn.used = True
        if self._closed or not conn.usable:
            conn.close()
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = asyncio.get_running_loop().time()
        self._idle.append(conn)

    def discount(self, conn: Connection) -> None:
        """A connection is closing: it no longer counts against the limit."""
        if conn.counted:
            conn.counted = False
            self._all.discard(conn)
            self._slot_freed()

    def _slot_freed(self) -> None:
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        """Room for one more connection: reserve it for the oldest waiter, if any."""
        while self._waiters and self._open < self._limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._open += 1
                waiter.set_result(None)  # no connection, but a slot to open one in
                return
