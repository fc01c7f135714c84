"""A keep-alive pool of HTTP/1.1 connections to one node (see ``spillway.nodes.h1``).

Connections go straight to the node, or through the node's HTTP proxy (``transport.Proxy``):
an https:// node through a CONNECT tunnel (``tunnel.py``), an http:// one with absolute-form
request targets. Which way, the TLS context and the header block are settled once, when the
pool is made; a request's path through the pool is the same either way.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from collections.abc import Mapping

import aiohappyeyeballs
from yarl import URL

from spillway.nodes.h1 import ConnectFailed, Connection, ConnectionBroke, ConnectTimedOut, Response
from spillway.nodes.outbox import Outbox
from spillway.nodes.transport import Transport
from spillway.nodes.tunnel import open_tunnel

#: A kept-alive connection idle longer than this is closed, not reused. A request written to
#: a connection the node is closing at that moment may have been read, or not; spillway
#: cannot tell, so it never sends it again (see ``Pool.request``) and the attempt fails.
#: Reusing only connections idle less than the usual server keep-alive timeouts keeps that
#: race rare: uvicorn (vLLM, SGLang, llama-cpp-python) closes after 5 s, nginx 75 s, Node
#: 5 s. A server that closes sooner (gunicorn's default is 2 s) has its FIN here long before
#: the next request takes the connection, and a closed connection is never taken.
KEEPALIVE_IDLE_S = 4.0
#: Only these methods are sent again, once, on a fresh connection when a kept-alive one broke
#: with no answer: they change nothing on the node (probes, metrics scrapes).
RESENDABLE = frozenset({"GET", "HEAD"})


class Pool:
    """Kept-alive connections to one node (``base_url`` such as ``http://10.0.0.5:8000/v1``).

    At most ``max_connections`` are open; a request beyond that waits for one, within its
    connect timeout. Idle connections are reused newest first and closed once idle for
    ``idle_s``. The ``transport``'s headers, then ``headers``, go on every request (the
    node's key among them: never logged here). An answer may hold at most
    ``max_body_bytes`` of body at once (``h1.Response``).
    """

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str],
        max_connections: int,
        max_body_bytes: int,
        idle_s: float = KEEPALIVE_IDLE_S,
        transport: Transport | None = None,
    ) -> None:
        url = URL(base_url)
        if url.scheme not in ("http", "https") or not url.raw_host:
            raise ValueError(f"node URL must be http(s)://host[:port]/path, not {url.scheme}://")
        if url.raw_user or url.raw_password or url.raw_query_string or url.raw_fragment:
            raise ValueError("node URL must not carry user:password@, a ?query or a #fragment")
        transport = transport or Transport()
        https = url.scheme == "https"
        self._host = url.raw_host
        self._port = url.port or (443 if https else 80)
        self._ssl = transport.ssl_context() if https else None
        proxy = transport.proxy
        self._dial = (proxy.host, proxy.port) if proxy else (self._host, self._port)
        self._proxied = proxy is not None
        self._tunnel = proxy if proxy is not None and https else None
        host_port = url.host_port_subcomponent or self._host
        # Through a proxy, an http:// request names the whole URL (absolute form).
        origin = f"http://{host_port}" if proxy is not None and not https else ""
        self._prefix = origin + url.raw_path.rstrip("/")
        fixed = _merged(
            {"Host": host_port, "User-Agent": "spillway", "Accept-Encoding": "identity"},
            transport.headers,
            headers,
        )
        if origin and proxy is not None and proxy.authorization is not None:
            fixed["Proxy-Authorization"] = proxy.authorization
        if any(c in item for pair in fixed.items() for item in pair for c in "\r\n\0"):
            raise ValueError("a node header name or value contains a line break or NUL")
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
        self.outbox = Outbox()  # this turn's requests leave together (``nodes/outbox.py``)
        self._loop: asyncio.AbstractEventLoop | None = None  # taken on first use

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop this pool serves, looked up once: on CPython 3.11 each
        ``asyncio.get_running_loop()`` is a ``getpid()`` system call, and a request made five."""
        if self._loop is None or self._loop.is_closed():  # a pool may outlive a loop (tests)
            self._loop = asyncio.get_running_loop()
        return self._loop

    @property
    def proxied(self) -> bool:
        """Whether requests go through a proxy (whose 407 is then not the node's)."""
        return self._proxied

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None,
        *,
        connect_timeout_s: float,
        deadline: float | None = None,
        max_body: int | None = None,
    ) -> Response:
        """Send one request; return once the answer's status and headers are in.

        A request is written once. If its connection then fails with no answer, the node may
        have read it and be working on it (a node that crashes or restarts closes its
        connections with requests in them), so a POST is never sent again here: sent twice,
        a generation could run twice. Stale connections are caught before the write instead
        (``_take_idle``). Only a GET or HEAD on a kept-alive connection goes once more, on a
        fresh connection. ``deadline`` (the loop's clock): the whole answer must be in by then.
        ``max_body``: this answer's own, smaller limit on its body.
        """
        data = self._encode(method, path, body)
        limit = self._max_body if max_body is None else min(max_body, self._max_body)
        conn = await self._acquire(connect_timeout_s)
        try:
            return await conn.exchange(data, limit, deadline)
        except ConnectionBroke as exc:
            if exc.answered or not conn.used or method not in RESENDABLE:
                raise
        fresh = await self._acquire(connect_timeout_s, fresh=True)
        return await fresh.exchange(data, limit, deadline)

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
        waiter: asyncio.Future[Connection | None] = self.loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                handed = await waiter
        except BaseException as exc:
            self._return_unclaimed(waiter)
            if isinstance(exc, TimeoutError):
                raise ConnectTimedOut("every connection to the node stayed busy") from None
            raise
        if handed is not None and (fresh or not handed.usable):
            if not handed.counted:  # it closed after being handed over, and freed its slot
                return await self._acquire(timeout_s, fresh=fresh)
            handed.counted = False  # take over its slot, but not the socket
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
                raise ConnectFailed(failure_reason(exc)) from None
            raise
        self._all.add(made)
        return made

    async def _open_socket(self, made: Connection) -> None:
        """A socket to the node or its proxy, the CONNECT tunnel through a proxy to an
        https:// node, then TLS (SNI: the node's host name) when the node is https://."""
        loop = asyncio.get_running_loop()
        sock = await self._dial_socket(loop)
        hostname = self._host if self._ssl is not None else None
        try:
            if self._tunnel is not None:
                await open_tunnel(sock, self._tunnel, self._host, self._port)
            await loop.create_connection(
                lambda: made, sock=sock, ssl=self._ssl, server_hostname=hostname
            )
        except BaseException:
            sock.close()
            raise

    async def _dial_socket(self, loop: asyncio.AbstractEventLoop) -> socket.socket:
        """Happy eyeballs (RFC 8305) over the addresses, as aiohttp's connector does: with a
        dead IPv6 route, IPv4 is tried after 0.25 s instead of after the timeout."""
        host, port = self._dial
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            return await aiohappyeyeballs.start_connection(infos, happy_eyeballs_delay=0.25)
        except OSError as exc:
            if not self._proxied:
                raise
            raise ConnectFailed(f"proxy: {type(exc).__name__}") from None

    def _take_idle(self) -> Connection | None:
        """The newest idle connection that is still open and idle less than ``idle_s``."""
        if not self._idle:
            return None
        expired = self.loop.time() - self._idle_s
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
        conn.idle_since = self.loop.time()
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


def _merged(*layers: Mapping[str, str]) -> dict[str, str]:
    """Headers from each layer in turn, a later one replacing an earlier one of the same name
    in any case (a node's ``User-Agent`` replaces spillway's)."""
    merged: dict[str, tuple[str, str]] = {}
    for layer in layers:
        merged.update({name.lower(): (name, value) for name, value in layer.items()})
    return dict(merged.values())


def failure_reason(exc: OSError) -> str:
    """Why a connection could not be made, in words fit for a client: a TLS failure says
    what was wrong with the certificate (never the host name it was checked against)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = exc.verify_message or exc.reason or "certificate verify failed"
        if "mismatch" in message.lower():
            message = "the certificate is not valid for the node's host name"
        return f"TLS: {message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or type(exc).__name__}"
    return type(exc).__name__
