"""The one HTTP client for every OpenAI-compatible node.

This module is the boundary where the HTTP client's errors, OSError and asyncio timeouts
become spillway errors; nothing above it sees a library exception. One keep-alive pool per
node (``h1.Pool``, with TCP_NODELAY), and the node's API key kept in the pool's headers only.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import orjson

from spillway.config.schema import Timeouts
from spillway.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamRejected,
    UpstreamStatusError,
    UpstreamTimeout,
)
from spillway.nodes.base import Reply
from spillway.nodes.h1 import (
    ConnectFailed,
    ConnectionBroke,
    ConnectTimedOut,
    H1Error,
    Response,
)
from spillway.nodes.pool import Pool
from spillway.secrets import Redactor
from spillway.wire.sse import SseDecoder, SseEvent

#: Node answers that mean "your request is wrong": forwarded to the client, never retried.
REQUEST_ERRORS = frozenset({400, 413, 422})


class HttpNode:
    """An OpenAI-compatible node reached over HTTP (``base_url`` ends in ``/v1``)."""

    def __init__(self, name: str, base_url: str, api_key: str | None, max_connections: int):
        self.name = name
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        # A node may echo its key in an error ("invalid key sk-…"): scrub it right here, at
        # the boundary, so no message built from the node's words can carry it further.
        self._redactor = Redactor([api_key] if api_key else [])
        self._pool = Pool(base_url, headers=headers, max_connections=max_connections)

    async def chat(self, body: bytes, timeouts: Timeouts) -> Reply:
        return await self._post("/chat/completions", body, timeouts)

    async def embed(self, body: bytes, timeouts: Timeouts) -> Reply:
        return await self._post("/embeddings", body, timeouts)

    async def probe(self, timeout_s: float) -> None:
        phase = "answer to GET /models"
        resp, payload = await self._fetch("GET", "/models", None, timeout_s, timeout_s, phase)
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
        return Reply(resp.status, payload, resp.content_type)

    async def _fetch(
        self, method: str, path: str, body: bytes | None, total_s: float, connect_s: float,
        phase: str,
    ) -> tuple[Response, bytes]:  # fmt: skip
        """Status, headers and the whole body; ``total_s`` covers connecting, sending and
        reading it all."""
        try:
            async with asyncio.timeout(total_s):
                resp = await self._pool.request(method, path, body, connect_timeout_s=connect_s)
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
        status = resp.status
        error = _error_fields(payload)
        text = str(error.get("message") or payload[:200].decode("utf-8", "replace"))
        message = self._redactor.scrub(text)
        if status in REQUEST_ERRORS:
            raise UpstreamRejected(
                self.name, status, message, param=error.get("param"), code=error.get("code")
            )
        retry_after = resp.headers.get("retry-after")
        raise UpstreamStatusError(self.name, status, message, retry_after=retry_after)

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
        if isinstance(exc, ConnectionBroke) and exc.refused:
            raise UpstreamConnectError(
                self.name, "connection closed before any answer", delivered=False
            ) from None
        if isinstance(exc, H1Error | OSError):
            reason = exc.reason if isinstance(exc, H1Error) else type(exc).__name__
            raise UpstreamConnectError(self.name, f"connection failed: {reason}") from None
        raise exc


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
