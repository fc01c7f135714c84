"""The one HTTP client for every OpenAI-compatible node.

This module is the boundary where aiohttp, OSError and asyncio timeouts become spillway
errors; nothing above it sees a library exception. One pooled session per node, TCP_NODELAY
(aiohttp's default), and the node's API key kept in the session headers only.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import aiohttp
import orjson
from yarl import URL

from spillway.config.schema import Timeouts
from spillway.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamRejected,
    UpstreamStatusError,
    UpstreamTimeout,
)
from spillway.nodes.base import Reply
from spillway.secrets import Redactor
from spillway.wire.sse import SseDecoder, SseEvent

#: Node answers that mean "your request is wrong": forwarded to the client, never retried.
REQUEST_ERRORS = frozenset({400, 413, 422})
_PATHS = ("/chat/completions", "/embeddings", "/models")


class HttpNode:
    """An OpenAI-compatible node reached over HTTP (``base_url`` ends in ``/v1``)."""

    def __init__(self, name: str, base_url: str, api_key: str | None, max_connections: int):
        self.name = name
        self._base = base_url.rstrip("/")
        # Parsed once: on the hot path aiohttp gets ready URL objects.
        self._urls = {path: URL(self._base + path) for path in _PATHS}
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        # A node may echo its key in an error ("invalid key sk-…"): scrub it right here, at
        # the boundary, so no message built from the node's words can carry it further.
        self._redactor = Redactor([api_key] if api_key else [])
        connector = aiohttp.TCPConnector(limit=max_connections, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector, headers=headers, trust_env=False, raise_for_status=False
        )

    async def chat(self, body: bytes, timeouts: Timeouts) -> Reply:
        return await self._post(self._urls["/chat/completions"], body, timeouts)

    async def embed(self, body: bytes, timeouts: Timeouts) -> Reply:
        return await self._post(self._urls["/embeddings"], body, timeouts)

    async def probe(self, timeout_s: float) -> None:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with self._session.get(self._urls["/models"], timeout=timeout) as resp:
                payload = await resp.read()
                if resp.status != 200:
                    self._raise_for(resp, payload)
        except Exception as exc:
            self._translate(exc, "answer to GET /models", timeout_s, timeout_s)

    async def aclose(self) -> None:
        await self._session.close()

    async def _post(self, url: URL, body: bytes, t: Timeouts) -> Reply:
        try:
            # aiohttp's own total timeout covers connecting, sending and reading the body.
            async with self._session.post(url, data=body, timeout=_whole_answer(t)) as resp:
                payload = await resp.read()
                if resp.status >= 300:
                    self._raise_for(resp, payload)
                return Reply(resp.status, payload, resp.content_type)
        except Exception as exc:
            self._translate(exc, "complete answer", t.total_s, t.connect_s)

    async def stream(self, body: bytes, t: Timeouts) -> AsyncIterator[SseEvent]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + t.total_s
        first_deadline = min(start + t.first_token_s, end)
        phase, deadline = "first token", first_deadline
        try:
            async with asyncio.timeout_at(first_deadline):
                resp = await self._session.post(
                    self._urls["/chat/completions"], data=body, timeout=_connect_timeout(t)
                )
                if resp.status >= 300:
                    try:
                        self._raise_for(resp, await resp.read())
                    finally:
                        resp.close()
        except Exception as exc:
            self._translate(exc, "first token", t.first_token_s, t.connect_s)
        try:
            decoder = SseDecoder()
            chunks = resp.content.iter_any()
            while True:
                async with asyncio.timeout_at(deadline):
                    chunk = await anext(chunks, None)
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

    def _raise_for(self, resp: aiohttp.ClientResponse, payload: bytes) -> NoReturn:
        status = resp.status
        error = _error_fields(payload)
        text = str(error.get("message") or payload[:200].decode("utf-8", "replace"))
        message = self._redactor.scrub(text)
        if status in REQUEST_ERRORS:
            raise UpstreamRejected(
                self.name, status, message, param=error.get("param"), code=error.get("code")
            )
        retry_after = resp.headers.get("Retry-After")
        raise UpstreamStatusError(self.name, status, message, retry_after=retry_after)

    def _translate(
        self, exc: BaseException, phase: str, seconds: float, connect_s: float
    ) -> NoReturn:
        if isinstance(exc, UpstreamError):
            raise exc
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            raise UpstreamTimeout(self.name, "connection", connect_s) from None
        if isinstance(exc, TimeoutError):
            raise UpstreamTimeout(self.name, phase, seconds) from None
        if isinstance(exc, aiohttp.ClientConnectorError):
            # The OS error's text names the node's address; clients need only the kind.
            reason = type(exc.os_error).__name__
            raise UpstreamConnectError(
                self.name, f"cannot connect ({reason})", delivered=False
            ) from None
        if isinstance(exc, aiohttp.ClientError | OSError):
            raise UpstreamConnectError(
                self.name, f"connection failed: {type(exc).__name__}"
            ) from None
        raise exc


@functools.lru_cache(maxsize=256)
def _connect_timeout(t: Timeouts) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=None, connect=t.connect_s, sock_connect=t.connect_s)


@functools.lru_cache(maxsize=256)
def _whole_answer(t: Timeouts) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=t.total_s, connect=t.connect_s, sock_connect=t.connect_s)


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
