"""Listening for clients: the runner, the cap on open connections, and idle timeouts.

A process keeps at most ``server.max_connections`` client connections open. Every open
connection holds a file descriptor, and once ``ulimit -n`` is reached nothing new can be
opened: not a client's connection, not one to a node, not the ledger. Idle connections cost
an attacker nothing to hold, so a newcomer beyond the cap takes the place of the
longest-open idle one (waiting for a request head: a kept-alive connection between requests,
or one that has not sent a whole head yet), as nginx reuses idle keep-alive connections when
it runs short. Only when every open connection is busy with a request is a newcomer refused,
with a 503, and closed at once.

Idle connections also close on their own after ``server.keepalive_timeout_s``: aiohttp
starts that timer when a connection opens and again after each answer, and closes the
connection if no whole request head arrived meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import cast

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from spillway.config.schema import ServerConfig
from spillway.errors import TooManyConnections
from spillway.secrets import Redactor
from spillway.wire.errors import error_body

log = logging.getLogger("spillway.server")

#: How long in-flight requests get to finish after SIGTERM before they are cut.
SHUTDOWN_GRACE_S = 30.0
#: the most characters of a path or User-Agent an access-log line repeats
MAX_LOGGED_PATH = 200
#: Descriptors a process keeps open besides client and node connections: the ledger (SQLite,
#: its WAL and shared memory), log files, the cache's store and index, model files, pipes to
#: managed nodes, the listening socket, the event loop's own.
FILE_HEADROOM = 128
#: The default cap's bounds. A connection holds 5 to 11 KiB of memory (measured: idle, and
#: after one request), so 10,000 hold about 100 MiB: past that, memory matters more than
#: descriptors. Below 16 the gateway is of no use.
MAX_DEFAULT_CONNECTIONS = 10_000
MIN_DEFAULT_CONNECTIONS = 16
#: How long a refused connection waits for the client to close after our answer.
LINGER_S = 2.0
#: Refusals are logged at most this often.
WARN_EVERY_S = 60.0


def connection_limit(server: ServerConfig, open_files: int | None = None) -> int:
    """``server.max_connections``, or by default half of what ``ulimit -n`` leaves after
    FILE_HEADROOM: each client connection with a request in flight may hold a node
    connection too."""
    if server.max_connections is not None:
        return server.max_connections
    files = open_file_limit() if open_files is None else open_files
    spare = (files - FILE_HEADROOM) // 2
    return max(MIN_DEFAULT_CONNECTIONS, min(MAX_DEFAULT_CONNECTIONS, spare))


def open_file_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 2**31 - 1
    return soft


class AccessLog(AbstractAccessLogger):
    """One line per request for ``[server] access_log``, like aiohttp's own but without the
    query string, which may carry a key (``?api_key=…``, as some clients send it), and
    without the Referer, which may carry a page's. The path is logged as sent, still
    percent-encoded, so it cannot break a log line."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        path = request.raw_path.partition("?")[0][:MAX_LOGGED_PATH]
        agent = request.headers.get("User-Agent", "-")[:MAX_LOGGED_PATH]
        self.logger.info(
            '%s "%s %s HTTP/%d.%d" %d %d %.6f "%s"',
            request.remote, request.method, path, *request.version, response.status,
            response.body_length, time, agent,
        )  # fmt: skip

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


async def start(
    app: web.Application,
    server: ServerConfig,
    *,
    reuse_port: bool = False,
    access_log: logging.Logger | None = None,
    handle_signals: bool = False,
) -> web.AppRunner:
    """Start ``app`` (its start-up hooks included) and listen on ``server.host:port``; the
    caller ends it with ``runner.cleanup()``."""
    runner = web.AppRunner(
        app,
        handle_signals=handle_signals,
        access_log=access_log,
        access_log_class=AccessLog,
        handler_cancellation=True,  # a client that goes away cancels its upstream call
        shutdown_timeout=SHUTDOWN_GRACE_S,
        keepalive_timeout=server.keepalive_timeout_s,
    )
    await runner.setup()
    limit = connection_limit(server)
    _report_limit(limit)
    site = CappedSite(runner, server.host, server.port, limit=limit, reuse_port=reuse_port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def _report_limit(limit: int) -> None:
    files = open_file_limit()
    needed = 2 * limit + FILE_HEADROOM
    if needed <= files:
        log.info("at most %d client connections (ulimit -n is %d)", limit, files)
        return
    log.warning(
        "at most %d client connections (server.max_connections), which may need %d open "
        "files, but ulimit -n is %d: raise it (ulimit -n %d, or LimitNOFILE= in a systemd "
        "unit) or lower server.max_connections",
        limit,
        needed,
        files,
        needed,
    )


class CappedSite(web.BaseSite):
    """A TCP site whose connections pass through a ``ConnectionCap``."""

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, *, limit: int, reuse_port: bool
    ):
        super().__init__(runner)
        self._host, self._port, self._reuse_port = host, port, reuse_port
        self._limit = limit
        self.cap: ConnectionCap | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self.cap = ConnectionCap(server, self._limit)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.cap,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_port=self._reuse_port or None,
        )


class ConnectionCap:
    """The protocol factory of the listening socket: aiohttp's, behind the cap."""

    def __init__(self, server: web.Server, limit: int):
        self._server = server
        self.limit = limit
        #: handlers made but not yet connected, with when: aiohttp lists a connection only
        #: from its connection_made, a loop iteration after this factory, so a burst of
        #: accepts in one iteration would all see the old count (asyncio's loop does that;
        #: uvloop does not). RequestHandler has __slots__ and no weak references.
        self._fresh: dict[RequestHandler, float] = {}
        self.evicted = 0
        self.refused = 0
        self._warned_at = -WARN_EVERY_S
        self._refusal = _refusal_bytes(limit)

    def __call__(self) -> asyncio.BaseProtocol:
        # In the order they opened. A copy, so O(open connections) per accept: a few
        # microseconds at a thousand, and accepts are rare next to requests.
        handlers = self._server.connections
        if len(handlers) + self._connecting() < self.limit:
            return self._made()
        if _close_oldest_idle(handlers):
            self.evicted += 1
            return self._made()
        self.refused += 1
        self._warn()
        return _Refusal(self._refusal)

    def _made(self) -> RequestHandler:
        handler = self._server()
        self._fresh[handler] = asyncio.get_running_loop().time()
        return handler

    def _connecting(self) -> int:
        """Handlers made and not yet connected. Forgotten once connected (a transport), closed
        (aiohttp drops ``_manager``), or a second old (an accept that never completed)."""
        if not self._fresh:
            return 0
        stale = asyncio.get_running_loop().time() - 1.0
        self._fresh = {
            h: at
            for h, at in self._fresh.items()
            if h.transport is None and h._manager is not None and at > stale
        }
        return len(self._fresh)

    def _warn(self) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning(
                "all %d connections (server.max_connections) are busy with requests: "
                "refused %d new ones so far (and closed %d idle ones to make room)",
                self.limit,
                self.refused,
                self.evicted,
            )


def _close_oldest_idle(handlers: list[RequestHandler]) -> bool:
    """Close the longest-open idle connection that never carried a request, else the
    longest-open idle one. Closing a kept-alive connection races its client's next request
    (one written as the socket closes is lost unanswered); one that never sent anything is
    also what a flood of connections is made of."""
    idle = [h for h in handlers if _waits_for_a_request(h)]
    if not idle:
        return False
    unused = [h for h in idle if h._request_count == 0]
    (unused or idle)[0].force_close()
    return True


def _waits_for_a_request(handler: RequestHandler) -> bool:
    """Whether the connection is idle: its loop waits for the next request head. This is
    aiohttp's own test before it closes an idle connection (``_process_keepalive``); nothing
    public tells it."""
    waiter = handler._waiter
    return waiter is not None and not waiter.done() and handler.transport is not None


def _refusal_bytes(limit: int) -> bytes:
    error = TooManyConnections(
        f"The gateway has {limit} connections open, all busy with requests. Retry shortly; "
        "its operator can raise server.max_connections (and ulimit -n)."
    )
    body = orjson.dumps(error_body(error, Redactor([])))
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class _Refusal(asyncio.Protocol):
    """A connection over the cap: answered 503 at once, then closed.

    Closed *lingering*: the answer is followed by our FIN, and what the client sends is read
    and dropped until it closes too, for at most LINGER_S. Closed at once, a socket with the
    client's unread request in it is reset, and the reset can reach the client before the
    503 does (seen on uvloop: every client that had sent its request got a reset)."""

    def __init__(self, answer: bytes):
        self._answer = answer
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = writer = cast(asyncio.Transport, transport)
        writer.write(self._answer)
        if not writer.can_write_eof():
            writer.close()
            return
        writer.write_eof()
        asyncio.get_running_loop().call_later(LINGER_S, writer.close)

    def data_received(self, data: bytes) -> None:
        pass  # the request we will not serve

    def eof_received(self) -> bool:
        return False  # the client is done too: close
