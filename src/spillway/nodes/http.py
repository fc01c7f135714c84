"""The one HTTP client for every OpenAI-compatible node.

This module is the boundary where the HTTP client's errors, OSError and asyncio timeouts
become spillway errors; nothing above it sees a library exception. One keep-alive pool per
node (``pool.Pool``, with TCP_NODELAY), reached the node's way (``transport.Transport``:
proxy, TLS, headers), and the node's API key kept in the pool's headers only.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import orjson

from spillway.config.schema import Timeouts
from spillway.errors import (
    UpstreamBadAnswer,
    UpstreamConnectError,
    UpstreamError,
    UpstreamRejected,
    UpstreamStatusError,
    UpstreamTimeout,
)
from spillway.nodes.base import Reply
from spillway.nodes.h1 import (
    AnswerTimedOut,
    AnswerTooLarge,
    ConnectFailed,
    ConnectTimedOut,
    H1Error,
    Response,
)
from spillway.nodes.pool import Pool
from spillway.nodes.transport import Transport
from spillway.secrets import Redactor
from spillway.wire.requests import CONTROL_CHARS
from spillway.wire.sse import SseDecoder, SseEvent, SseTooLarge

#: The most of a ``GET /models`` answer read (readiness and breaker probes, which anyone may
#: make happen through /readyz): a model list is kilobytes.
PROBE_MAX_BYTES = 1024 * 1024
#: Node answers that mean "your request is wrong": forwarded to the client, never retried.
REQUEST_ERRORS = frozenset({400, 413, 422})
#: The most characters of a node's own words that spillway passes on: an error's
#: ``message``; the start of an error body that is not an OpenAI error; its ``param`` and
#: ``code`` (which also become the ledger's ``error_code``).
MAX_MESSAGE_CHARS = 1000
MAX_RAW_CHARS = 200
MAX_FIELD_CHARS = 100


class HttpNode:
    """An OpenAI-compatible node reached over HTTP (``base_url`` ends in ``/v1``).

    An answer's body may be at most ``max_response_bytes`` (after decompression; for a
    stream, what it has sent but spillway not yet taken), an error's is read only as far as
    ``h1.MAX_ERROR_BODY_BYTES``.
    """

    def __init__(
        self,
        name: str,
        base_url: str,
        transport: Transport | None,
        max_connections: int,
        *,
        max_response_bytes: int,
    ):
        self.name = name
        transport = transport or Transport()
        # A node may echo its key in an error ("invalid key sk-…"), a proxy its credentials:
        # scrub them right here, at the boundary, so no message built from the node's words
        # can carry them further.
        self._redactor = Redactor(transport.secrets)
        self._pool = Pool(
            base_url,
            headers={"Content-Type": "application/json"},
            max_connections=max_connections,
            max_body_bytes=max_response_bytes,
            transport=transport,
        )

    async def chat(self, body: bytes, timeouts: Timeouts) -> Reply:
        return await self._post("/chat/completions", body, timeouts)

    async def embed(self, body: bytes, timeouts: Timeouts) -> Reply:
        return await self._post("/embeddings", body, timeouts)

    async def probe(self, timeout_s: float) -> None:
        phase = "answer to GET /models"
        resp, payload = await self._fetch(
            "GET", "/models", None, timeout_s, timeout_s, phase, max_body=PROBE_MAX_BYTES
        )
        if resp.status != 200:
            self._raise_for(resp, payload)

    async def aclose(self) -> None:
        await self._pool.aclose()

    async def _post(self, path: str, body: bytes, t: Timeouts) -> Reply:
        resp, payload = await self._fetch(
            "POST", path, body, t.total_s, t.connect_s, "complete answer"
        )
        if resp.status >= 300:
            self._raise_for(resp, payload)
        data = _json_object(payload)
        if data is None:  # an HTML error page behind a 200, or broken JSON: not an answer
            raise UpstreamBadAnswer(
                self.name, f"HTTP {resp.status} with a body that is not a JSON object"
            )
        if data.get("error"):  # some providers and proxies answer a failure with 200
            self._raise_for(resp, payload)
        return Reply(resp.status, payload, resp.content_type, data)

    async def _fetch(
        self, method: str, path: str, body: bytes | None, total_s: float, connect_s: float,
        phase: str, max_body: int | None = None,
    ) -> tuple[Response, bytes]:  # fmt: skip
        """Status, headers and the whole body; ``total_s`` covers connecting, sending and
        reading it all (the connection within ``connect_s`` of it)."""
        deadline = self._pool.loop.time() + total_s
        connect_s = min(connect_s, total_s)  # the error then names the limit that applied
        try:
            resp = await self._pool.request(
                method, path, body, connect_timeout_s=connect_s, deadline=deadline,
                max_body=max_body,
            )  # fmt: skip
            return resp, await resp.read()
        except Exception as exc:
            self._translate(exc, phase, total_s, connect_s)

    async def stream(self, body: bytes, t: Timeouts) -> AsyncIterator[SseEvent]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + t.total_s
        first_deadline = min(start + t.first_token_s, end)
        phase, deadline = "first token", first_deadline
        try:
            async with asyncio.timeout_at(first_deadline):
                resp = await self._pool.request(
                    "POST", "/chat/completions", body, connect_timeout_s=t.connect_s
                )
                if resp.status >= 300:
                    self._raise_for(resp, await resp.read())
        except Exception as exc:
            self._translate(exc, "first token", t.first_token_s, t.connect_s)
        try:
            decoder = SseDecoder()
            while True:
                async with asyncio.timeout_at(deadline):
                    chunk = await resp.next_chunk()
                events = decoder.feed(chunk) if chunk is not None else decoder.close()
                for event in events:
                    yield event
                    phase, deadline = "next chunk", min(loop.time() + t.idle_s, end)
                if chunk is None:
                    return
        except Exception as exc:
            budget = {"first token": t.first_token_s, "next chunk": t.idle_s}[phase]
            if deadline == end:
                phase, budget = "complete answer", t.total_s
            self._translate(exc, phase, budget, t.connect_s)
        finally:
            resp.close()

    def _raise_for(self, resp: Response, payload: bytes) -> NoReturn:
        """The node's failure, from its answer (a 200 that carries an error included: the
        node's failure, never the request's)."""
        status = resp.status
        if status == 407 and self._pool.proxied:  # the proxy's answer: the node saw nothing
            raise UpstreamConnectError(
                self.name,
                "proxy refused the request: HTTP 407 Proxy Authentication Required",
                delivered=False,
            )
        error = _error_fields(payload)
        if error.get("message"):
            message = self._redactor.excerpt(str(error["message"]), MAX_MESSAGE_CHARS)
        else:
            message = self._redactor.excerpt(payload.decode("utf-8", "replace"), MAX_RAW_CHARS)
        if status in REQUEST_ERRORS:
            param, code = self._field(error.get("param")), self._field(error.get("code"))
            raise UpstreamRejected(self.name, status, message, param=param, code=code)
        retry_after = resp.headers.get("retry-after")
        raise UpstreamStatusError(self.name, status, message, retry_after=retry_after)

    def _field(self, value: object) -> str | None:
        """A node's ``param`` or ``code``: a short scrubbed string; anything else is dropped."""
        if not isinstance(value, str):
            return None
        # It becomes the ledger's error_code, which `spillway report` prints and exports.
        return CONTROL_CHARS.sub("?", self._redactor.excerpt(value, MAX_FIELD_CHARS))

    def _translate(
        self, exc: BaseException, phase: str, seconds: float, connect_s: float
    ) -> NoReturn:
        if isinstance(exc, UpstreamError):
            raise exc
        if isinstance(exc, ConnectTimedOut):
            raise UpstreamTimeout(self.name, "connection", connect_s) from None
        if isinstance(exc, TimeoutError):
            raise UpstreamTimeout(self.name, phase, seconds) from None
        if isinstance(exc, ConnectFailed):
            # The reason names only the kind of failure, never the node's address.
            raise UpstreamConnectError(
                self.name, f"cannot connect ({exc.reason})", delivered=False
            ) from None
        if isinstance(exc, AnswerTimedOut):
            raise UpstreamTimeout(self.name, phase, seconds) from None
        if isinstance(exc, AnswerTooLarge):
            raise UpstreamBadAnswer(
                self.name,
                f"{exc.reason}: raise nodes.{self.name}.max_response_bytes if answers this"
                " large are expected",
            ) from None
        if isinstance(exc, H1Error | OSError):
            reason = exc.reason if isinstance(exc, H1Error) else type(exc).__name__
            raise UpstreamConnectError(self.name, f"connection failed: {reason}") from None
        if isinstance(exc, SseTooLarge):
            raise UpstreamBadAnswer(self.name, str(exc)) from None
        raise exc


def _json_object(payload: bytes) -> dict[str, Any] | None:
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _error_fields(payload: bytes) -> dict[str, Any]:
    """The ``error`` object of an OpenAI error body, or {} when the body is something else."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return {}
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return error
    if isinstance(error, str):  # some engines send {"error": "text"}
        return {"message": error}
    if isinstance(data, dict) and isinstance(data.get("detail"), str):  # FastAPI style
        return {"message": data["detail"]}
    return {}
