"""A small Redis client for shared state: one pipelined connection, replies in order.

Why not redis-py here (the cache's Redis store keeps it): every request claims its node slot
in Redis, and redis-py's asyncio client spent 50-90 µs of the event loop's CPU on each call
(its pool, command objects and parser), measured on the benchmark machine: with three calls a
request, shared state cut a worker's throughput to 0.30x. RESP is simple enough that one
connection, written to in order and read back in order, does the same job: each call is one
write and one future, and the replies are parsed in C by ``hiredis`` when it is installed.

- ``redis://[[user]:password@]host:port/db``, ``rediss://`` (TLS, certificates verified) and
  ``unix:///path?db=N``; the password and db are sent (AUTH, SELECT) on connecting.
- Calls may overlap: RESP answers in the order asked, so the n-th reply goes to the n-th
  waiting future. A caller that gives up (its client went away) leaves its future in the
  queue, and the reply that comes for it is dropped: the others keep their connection. A
  connection that fails is dropped and every call still waiting on it fails; the next call
  connects again. Bounding each call's time is the caller's job (``SharedState.call``), which
  ``reset()``s the connection after a timeout: a server that stopped answering may never
  answer on it again.
- Scripts run with EVALSHA, loaded with SCRIPT LOAD the first time Redis says NOSCRIPT.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

try:  # C parser when available (an optional speed-up, not a dependency)
    import hiredis
except ImportError:  # pragma: no cover - exercised where hiredis is absent
    hiredis = None  # type: ignore[assignment]

Arg = str | bytes | int | float


def text(value: bytes | str) -> str:
    """A bulk-string reply as text (Redis answers bytes; a decoded client answers str)."""
    return value.decode() if isinstance(value, bytes) else value


class ReplyError(Exception):
    """Redis answered a command with an error (``-ERR ...``)."""


class RespClient:
    def __init__(self, url: str):
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r}")
        try:
            _ = parts.port
        except ValueError:
            raise ValueError("not a valid Redis URL (its port is not a number)") from None
        self._parts = parts
        query = parse_qs(parts.query)
        path_db = parts.path.strip("/") if parts.scheme != "unix" else ""
        self._db = int(query.get("db", [path_db or "0"])[0])
        self._user = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        self._conn: _Connection | None = None
        self._connecting: asyncio.Lock | None = None

    def register_script(self, text: str) -> Script:
        return Script(self, text)

    async def execute(self, *args: Arg) -> Any:
        conn = await self._connection()
        return await conn.call(args)

    async def execute_many(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Several commands sent in one write (a pipeline, not a transaction)."""
        conn = await self._connection()
        return await conn.call_many(commands)

    def reset(self) -> None:
        """Drop the connection (the calls waiting on it fail); the next call connects again."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close(ConnectionError("connection reset after a timeout"))

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close(ConnectionError("client closed"))

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            conn = self._conn
            if conn is None or conn.closed:
                conn = self._conn = await self._connect()
        return conn

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        parts = self._parts
        factory = _Connection
        if parts.scheme == "unix":
            _, conn = await loop.create_unix_connection(factory, parts.path)
        else:
            tls = ssl.create_default_context() if parts.scheme == "rediss" else None
            host, port = parts.hostname or "localhost", parts.port or 6379
            _, conn = await loop.create_connection(factory, host, port, ssl=tls)
        try:
            if self._password is not None:
                auth = [self._user, self._password] if self._user else [self._password]
                await conn.call(("AUTH", *auth))
            if self._db:
                await conn.call(("SELECT", self._db))
        except BaseException:
            conn.close(ConnectionError("setting up the connection failed"))
            raise
        return conn


class Script:
    """A Lua script, run by its SHA1 (loaded on first NOSCRIPT)."""

    def __init__(self, client: RespClient, text: str):
        self._client = client
        self._text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    async def __call__(self, keys: Sequence[Arg] = (), args: Sequence[Arg] = ()) -> Any:
        command = ("EVALSHA", self.sha, len(keys), *keys, *args)
        try:
            return await self._client.execute(*command)
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self._client.execute("SCRIPT", "LOAD", self._text)
        return await self._client.execute(*command)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._reader: Any = hiredis.Reader() if hiredis is not None else _Reader()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while True:
            try:
                reply = self._reader.gets()
            except Exception as exc:  # a protocol error: nothing more can be trusted
                self.close(ConnectionError(f"bad reply from Redis: {exc}"))
                return
            if reply is False:
                return
            if not self._waiting:
                self.close(ConnectionError("a reply nobody asked for"))
                return
            waiter = self._waiting.popleft()
            if waiter.done():  # its caller gave up: the reply was its, and nobody's now
                continue
            if isinstance(reply, Exception):
                waiter.set_exception(ReplyError(str(reply)))
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(ConnectionError(f"connection to Redis lost: {exc}" if exc else "closed"))

    async def call(self, args: Sequence[Arg]) -> Any:
        # Cancelled, the future stays queued and its reply is dropped when it comes.
        return await self._send([args])[0]

    async def call_many(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        waiters = self._send(commands)
        try:
            replies = await asyncio.gather(*waiters, return_exceptions=True)
        except BaseException:
            for waiter in waiters:  # gather left them pending: mark them given up
                waiter.cancel()
            raise
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return replies

    def _send(self, commands: Sequence[Sequence[Arg]]) -> list[asyncio.Future[Any]]:
        if self.closed or self._transport is None:
            raise ConnectionError("connection to Redis closed")
        loop = asyncio.get_running_loop()
        waiters = [loop.create_future() for _ in commands]
        self._waiting.extend(waiters)
        self._transport.write(b"".join(_encode(c) for c in commands))
        return waiters

    def close(self, exc: Exception) -> None:
        if self.closed:
            return
        self.closed = True
        waiting, self._waiting = self._waiting, deque()
        for waiter in waiting:
            if not waiter.done():
                waiter.set_exception(exc)
                waiter.exception()  # retrieved: a caller that gave up must not log it
        if self._transport is not None:
            self._transport.close()


def _encode(args: Sequence[Arg]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, float):
            data = repr(arg).encode()
        else:
            data = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Reader:
    """RESP2 replies, for where hiredis is not installed: the same ``feed`` / ``gets``."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def gets(self) -> Any:
        parsed = _parse(self._buffer, 0)
        if parsed is None:
            return False
        reply, end = parsed
        del self._buffer[:end]
        return reply


def _parse(buf: bytearray, start: int) -> tuple[Any, int] | None:
    line_end = buf.find(b"\r\n", start)
    if line_end < 0:
        return None
    kind, line = buf[start : start + 1], bytes(buf[start + 1 : line_end])
    after = line_end + 2
    if kind == b"+":
        return line, after
    if kind == b"-":
        return ReplyError(line.decode(errors="replace")), after
    if kind == b":":
        return int(line), after
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, after
        if len(buf) < after + size + 2:
            return None
        return bytes(buf[after : after + size]), after + size + 2
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, after
        items = []
        for _ in range(count):
            parsed = _parse(buf, after)
            if parsed is None:
                return None
            item, after = parsed
            items.append(item)
        return items, after
    raise ValueError(f"unknown RESP type {kind!r}")
