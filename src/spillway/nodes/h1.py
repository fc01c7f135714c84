"""A lean HTTP/1.1 client for node calls: one keep-alive pool per node, parsed by httptools.

Why not aiohttp's client: measured on the 2-core bench machine, aiohttp's ClientSession spends
about 100 µs of CPU on every request (request and response objects, timers, trace hooks,
cookie and header machinery), as much as the rest of a proxied request. A bare aiohttp proxy
that calls its upstream through this module instead serves 2.2x the requests per second
(docs/performance.md). This client does only what a node call needs: a request with a bytes
body, the answer read whole or as it arrives, keep-alive, TLS, gzip/deflate bodies, bounds on
what a node can make the gateway hold (headers, body, inflated body), and an exact account of
*where* a failure happened, which failover depends on:

- ``ConnectFailed`` (and ``ConnectTimedOut``): no connection; the node never saw the request.
- ``ConnectionBroke``: the connection failed once the request was on its way.

A POST, once written, is never written again on another connection: the node may have read
it before the connection failed (``pool.Pool.request`` says why, and how stale connections
are left out before the write instead).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import zlib
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import httptools

if TYPE_CHECKING:
    from spillway.nodes.pool import Pool

#: A stream's unread bytes above which the node's socket stops being read (a slow client
#: then slows the node down instead of filling the gateway's memory), and below which it
#: is read again.
PAUSE_AT = 256 * 1024
RESUME_AT = 64 * 1024
#: The most bytes a node may send before its answer's headers end (interim 1xx answers
#: included). A model server's headers take a few hundred bytes; past this the answer is
#: refused, so a broken or hostile node cannot fill the gateway's memory with headers.
MAX_HEAD_BYTES = 64 * 1024
#: The most bytes of an error answer's body (status 300 or more) that are read; the rest is
#: never read and its connection closed. An error says what went wrong in its first few
#: hundred bytes, and spillway passes on no more than a thousand characters of it.
MAX_ERROR_BODY_BYTES = 64 * 1024


class H1Error(Exception):
    """Base of this module's errors; ``reason`` is safe to show (no address, no secret)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def fresh(self) -> H1Error:
        """A copy to raise, so that the stored one never holds a traceback: raised itself, it
        would keep the frames it passed (a response with its body, the request) alive in a
        reference cycle through the response that stores it."""
        clone = self.__class__.__new__(self.__class__)
        clone.args = self.args
        clone.__dict__.update(self.__dict__)
        return clone


class ConnectFailed(H1Error):
    """No connection could be opened: the request never reached the node."""


class ConnectTimedOut(ConnectFailed):
    """No connection within the connect timeout (including the wait for a pool slot)."""


class ConnectionBroke(H1Error):
    """The connection failed, or the node broke the protocol, after the request was sent."""

    def __init__(self, reason: str, *, answered: bool) -> None:
        super().__init__(reason)
        #: whether any byte of the answer had arrived
        self.answered = answered


class AnswerTooLarge(H1Error):
    """A successful answer's body would pass the size limit; ``limit`` is that limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"answer over {limit} bytes")
        self.limit = limit


class AnswerTimedOut(H1Error):
    """The answer was not complete by its deadline (``Connection.exchange``)."""


class Response:
    """One answer: status and headers once they are in; the body whole or chunk by chunk.

    An unfinished answer that is abandoned (``close``, or a cancelled read) closes its
    connection: a connection with an answer still in flight can never be reused.

    At most ``max_body`` bytes of body (after decoding) are held at once: all of it for
    ``read``, the part not yet taken for ``next_chunk`` (so a stream is not limited in total,
    only in what it leaves unread). A successful answer past that fails with
    ``AnswerTooLarge``; an error answer's body is cut at ``MAX_ERROR_BODY_BYTES`` instead.
    Either way its connection is closed at once: nothing more of it is read.
    """

    __slots__ = (
        "_buffered", "_chunks", "_conn", "_decoder", "_done", "_error", "_limit", "_streaming",
        "_timer", "_until_eof", "_waiter", "answered", "headers", "sent", "status",
    )  # fmt: skip

    def __init__(self, conn: Connection, max_body: int) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.answered = False  # any byte of the answer arrived
        self.sent = False  # the request was written (it waits in the outbox until then)
        self._conn = conn
        self._limit = max_body
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._done = False
        self._error: H1Error | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._streaming = False
        self._decoder: zlib._Decompress | None = None
        self._until_eof = False  # no length and not chunked: the body ends when the socket does
        self._timer: asyncio.TimerHandle | None = None

    def expire_at(self, deadline: float) -> None:
        """Fail the answer (``AnswerTimedOut``) unless it is complete by ``deadline`` (the
        loop's clock). One timer handle: cheaper on every request than ``asyncio.timeout``,
        which makes, reschedules and unwinds a cancellation scope."""
        self._timer = self._conn.loop.call_at(deadline, self._expired)

    def _expired(self) -> None:
        self._timer = None
        self._fail(AnswerTimedOut("the answer was not complete in time"))

    def _settled(self) -> None:
        """Complete or failed: the deadline no longer matters."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @property
    def content_type(self) -> str:
        """The media type without parameters, as aiohttp's ``content_type`` gives it."""
        raw = self.headers.get("content-type", "application/octet-stream")
        return raw.partition(";")[0].strip().lower()

    async def read(self) -> bytes:
        """The whole body (decoded if the node compressed it)."""
        if not self._done:  # a small answer is often whole by the time its headers are read
            await self.wait_until(lambda: self._done)
        body = b"".join(self._chunks)
        self._chunks.clear()
        return body

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body as it arrived, or None at its end."""
        self._streaming = True
        await self.wait_until(lambda: bool(self._chunks) or self._done)
        if not self._chunks:
            return None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._buffered < RESUME_AT and not self._done:  # done: the socket is another's now
            self._conn.resume()
        return chunk

    def close(self) -> None:
        """Give up on the rest of the answer (a no-op once it is complete)."""
        self._settled()
        if not self._done:
            self._conn.close()

    async def wait_until(self, ready: Callable[[], bool]) -> None:
        """Wait for the connection to make ``ready()`` true; raise its error if it fails first.
        A wait given up (cancelled, timed out) abandons the answer, closing the connection."""
        try:
            while not ready():
                if self._error is not None:
                    raise self._error.fresh()
                self._waiter = self._conn.loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
        except BaseException:
            self.close()
            raise

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- fed by the connection -------------------------------------------------------------

    def _headers_done(self, status: int) -> None:
        self.status = status
        if status >= 300:
            self._limit = min(self._limit, MAX_ERROR_BODY_BYTES)
        # spillway asks for identity, yet a proxy in front of a node may compress anyway:
        # such a body is inflated rather than refused, so that node keeps working, and
        # under the same limit as any other (``_inflate``), so a small bomb cannot become
        # a huge body. Refusing would protect no better and break a node that works.
        encoding = self.headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            self._decoder = zlib.decompressobj(wbits=47)  # 32 + 15: gzip or zlib header
        elif encoding != "identity":
            self._fail(ConnectionBroke("unsupported content-encoding", answered=True))
            return
        if status < 300 and _declared_length(self.headers) > self._limit:
            self._fail(AnswerTooLarge(self._limit))  # refused before one byte of it is read
            return
        framed = "content-length" in self.headers or "transfer-encoding" in self.headers
        self._until_eof = not framed and status not in (204, 304)
        self._wake()

    def _feed(self, data: bytes) -> None:
        if self._error is not None or self._done:
            return
        if self._decoder is None:
            self._keep(data)
            return
        try:
            self._inflate(data)
        except zlib.error:
            self._fail(ConnectionBroke("undecodable compressed body", answered=True))

    def _inflate(self, data: bytes) -> None:
        """Decompress no more than the limit leaves room for, plus one byte to tell that it
        was passed: the input left over waits in ``unconsumed_tail`` for the next round."""
        assert self._decoder is not None
        while data and self._error is None and not self._done:
            room = self._limit - self._buffered  # >= 0 here; max_length 0 would mean "all"
            self._keep(self._decoder.decompress(data, room + 1))
            data = self._decoder.unconsumed_tail

    def _keep(self, data: bytes) -> None:
        """Hold a piece of body, within the limit."""
        if not data:
            return
        room = self._limit - self._buffered
        if len(data) > room:
            if self.status < 300:
                self._fail(AnswerTooLarge(self._limit))
                return
            # An error's beginning says enough: keep that much, end the body there, and
            # close the connection so that nothing more of it is read.
            self._hold(data[:room])
            self._conn.close()
            self._done = True
            self._settled()
            self._wake()
            return
        self._hold(data)

    def _hold(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
            self._buffered += len(data)
            if self._streaming:
                if self._buffered > PAUSE_AT:
                    self._conn.pause()
                self._wake()

    def _complete(self) -> None:
        if self._error is not None or self._done:
            return
        if self._decoder is not None:
            tail = self._decoder.flush()
            if not self._decoder.eof:
                self._fail(ConnectionBroke("compressed body cut short", answered=True))
                return
            self._keep(tail)
            if self._error is not None or self._done:
                return
        self._done = True
        self._settled()
        self._wake()

    def _fail(self, error: H1Error) -> None:
        if not self._done and self._error is None:
            self._error = error
            self._settled()
            self._conn.close()
            self._wake()

    def _connection_lost(self, exc: Exception | None, fresh: bool) -> None:
        if not self.sent:  # closed while the request waited in the outbox: it never left
            self._fail(ConnectFailed("connection closed before the request was sent"))
        elif self._until_eof and self.status and exc is None:  # a clean close ends the body
            self._complete()
        elif fresh and not self.answered and isinstance(exc, ssl.SSLError):
            # A TLS 1.3 server checks the client's certificate after the client has finished
            # its handshake, so a refusal (no or a wrong certificate) arrives as an alert after
            # our write. The node's TLS layer dropped the request: it never reached the node.
            self._fail(ConnectFailed(f"TLS: {exc.reason or type(exc).__name__}"))
        else:
            self._fail(ConnectionBroke("connection closed by the node", answered=self.answered))


def _declared_length(headers: dict[str, str]) -> int:
    """The body length the node declared; 0 when it declared none (or a malformed one,
    which the parser itself refuses)."""
    try:
        return int(headers.get("content-length", "0"))
    except ValueError:
        return 0


#: Header names as nodes spell them, already lower-cased: a dict lookup instead of a decode
#: and a lower() for each of an answer's usual headers.
_USUAL_NAMES = (
    "Content-Type", "Content-Length", "Transfer-Encoding", "Content-Encoding", "Connection",
    "Date", "Server", "Keep-Alive", "Cache-Control", "Retry-After", "X-Request-Id",
)  # fmt: skip
_COMMON_NAMES = {s.encode(): s.lower() for n in _USUAL_NAMES for s in (n, n.lower())}


def _head_too_long() -> ConnectionBroke:
    return ConnectionBroke(f"answer headers over {MAX_HEAD_BYTES // 1024} KiB", answered=True)


class Connection(asyncio.Protocol):
    """One socket to the node, carrying one exchange at a time; its ``Pool`` keeps it."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self.loop = pool.loop
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.current: Response | None = None
        self.used = False  # has carried a whole exchange, so it may have gone stale since
        self.counted = True  # still counts against the pool's limit
        self.idle_since = 0.0
        self._open = False
        self._paused = False
        self._informational = False  # parsing a 1xx interim answer
        self._ended: bool | None = None  # an answer ended in this read: may the socket stay?
        self._stray = False  # the node sent bytes beyond its answer
        # Both bound the current answer's headers (interim 1xx answers included) by
        # MAX_HEAD_BYTES: the bytes read while they were unfinished catch headers that never
        # end; the parsed status lines and headers catch those that end within one read.
        self._head_bytes = 0
        self._parsed_head_bytes = 0

    @property
    def usable(self) -> bool:
        return (
            self._open
            and self.current is None
            and self.transport is not None
            and not self.transport.is_closing()
        )

    async def exchange(self, data: bytes, max_body: int, deadline: float | None = None) -> Response:
        """Send one request; return once the answer's status and headers are in. The answer
        may hold at most ``max_body`` bytes of body (see ``Response``), and must be complete
        by ``deadline`` (the loop's clock), if one is given."""
        if not self.usable:  # closed between our taking it and this write: nothing was sent
            raise ConnectFailed("connection closed before the request was sent")
        assert self.transport is not None
        response = self.current = Response(self, max_body)
        if deadline is not None:
            response.expire_at(deadline)
        self._head_bytes = self._parsed_head_bytes = 0
        self._pool.outbox.send(lambda: self._deliver(response, data))
        await response.wait_until(lambda: response.status != 0)
        return response

    def _deliver(self, response: Response, data: bytes) -> None:
        """Write a request, now or when the pool's outbox sends it; never raises."""
        if self.current is not response:
            return  # abandoned (the wait was given up): its connection is closed already
        if self.transport is None or self.transport.is_closing():
            response._fail(ConnectFailed("connection closed before the request was sent"))
            return
        response.sent = True
        self.transport.write(data)

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.transport.is_closing():
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self._pool.discount(self)

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        self._open = True
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        exchange = self.current
        if exchange is None:  # bytes nobody asked for (e.g. a 408 before an idle close)
            self.close()
            return
        exchange.answered = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            exchange._fail(ConnectionBroke(f"malformed answer ({exc})", answered=True))
            self.close()  # the parser is stuck in its error state: never reuse it
            return
        if exchange.status == 0 and self._over_head_limit(len(data)):
            exchange._fail(_head_too_long())
            return
        if self._ended is not None:  # the answer ended in this read: only now, after parsing
            keep, self._ended = self._ended, None  # every byte of it, may the socket be reused
            if keep and not self._stray:
                self._pool.release(self)
            else:
                self.close()

    def _over_head_limit(self, received: int) -> bool:
        """Count bytes read while the headers are still unfinished."""
        self._head_bytes += received
        return self._head_bytes > MAX_HEAD_BYTES

    def connection_lost(self, exc: Exception | None) -> None:
        self._open = False
        self._pool.discount(self)
        exchange, self.current = self.current, None
        if exchange is not None:
            exchange._connection_lost(exc, fresh=not self.used)

    # --- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.current is None:  # bytes after the answer: a node out of step with us
            self._stray = True

    def on_status(self, reason: bytes) -> None:
        self._parsed_head_bytes += len(reason) + 15  # "HTTP/1.1 200 " and its CRLF

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        self._parsed_head_bytes += len(name) + len(value) + 4  # ": " and CRLF
        key = _COMMON_NAMES.get(name) or name.decode("latin-1").lower()
        self.current.headers[key] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        assert self.current is not None
        if self._parsed_head_bytes > MAX_HEAD_BYTES:  # all of them came in one read
            self.current._fail(_head_too_long())  # closes: nothing more of it is read
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # "100 Continue", "103 Early Hints": the answer comes next
            self._informational = True
            self.current.headers.clear()
            return
        self.current._headers_done(status)

    def on_body(self, body: bytes) -> None:
        assert self.current is not None
        self.current._feed(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        exchange, self.current = self.current, None
        assert exchange is not None
        self._ended = self._parser.should_keep_alive() and exchange._error is None
        exchange._complete()
        self.resume()
