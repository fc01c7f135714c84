"""A keep-alive pool of HTTP/1.1 connections to one node (see ``spillway.nodes.h1``)."""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Mapping

from yarl import URL

from spillway.nodes.h1 import ConnectFailed, Connection, ConnectionBroke, ConnectTimedOut, Response


class Pool:
    """Kept-alive connections to one node (``base_url`` such as ``http://10.0.0.5:8000/v1``).

    At most ``max_connections`` are open; a request beyond that waits for one, within its
    connect timeout. Idle connections are reused newest first and closed after ``idle_s``.
    ``headers`` go on every request (the node's key among them: never logged here).
    """

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str],
        max_connections: int,
        idle_s: float = 15.0,
    ) -> None:
        url = URL(base_url)
        if url.scheme not in ("http", "https") or not url.raw_host:
            raise ValueError(f"node URL must be http(s)://host[:port]/path, not {url.scheme}://")
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
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed.items())
        self._limit = max_connections
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
            return await conn.exchange(data)
        except ConnectionBroke as exc:
            if not conn.used or exc.answered:
                raise
        # The kept-alive connection had gone stale: once more on a fresh one.
        return await (await self._acquire(connect_timeout_s, fresh=True)).exchange(data)

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
        head = f"{method} {self._prefix}{path} HTTP/1.1\r\n{self._fixed}"
        if body is None:
            return (head + "\r\n").encode("latin-1")
        return (head + f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1") + body

    async def _acquire(self, timeout_s: float, *, fresh: bool = False) -> Connection:
        """An idle connection (unless ``fresh``), a new one, or the next one released."""
        conn = None if fresh else self._take_idle()
        if conn is not None:
            return conn
        if self._open < self._limit:
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
        return handed if handed is not None else await self._connect(timeout_s)

    def _return_unclaimed(self, waiter: asyncio.Future[Connection | None]) -> None:
        """A waiter gave up: a connection (or slot) handed to it in the meantime goes on."""
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            handed = waiter.result()
            if handed is not None:
                self.release(handed)
            else:
                self._wake_one()
        elif waiter in self._waiters:
            self._waiters.remove(waiter)

    async def _connect(self, timeout_s: float) -> Connection:
        if self._closed:
            raise ConnectFailed("the node's client is closed")
        self._open += 1
        made = Connection(self)  # counts against the limit until discounted, exactly once
        hostname = self._host if self._ssl is not None else None
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.get_running_loop().create_connection(
                    lambda: made, self._host, self._port, ssl=self._ssl, server_hostname=hostname
                )
        except BaseException as exc:
            made.close()  # a transport made before a cancellation is closed too
            if isinstance(exc, TimeoutError):
                raise ConnectTimedOut(f"no connection within {timeout_s:g} s") from None
            if isinstance(exc, OSError):  # refused, unreachable, DNS, TLS (SSLError is one)
                raise ConnectFailed(type(exc).__name__) from None
            raise
        self._all.add(made)
        return made

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
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # no connection, but room to open one
                return
