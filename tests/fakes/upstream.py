"""A scripted OpenAI-compatible upstream, for fault injection only.

It speaks the OpenAI wire format faithfully (chat.completion JSON, chat.completion.chunk SSE
with a usage chunk when asked, OpenAI error envelopes) and misbehaves on command: error
statuses, stalls before the first byte, streams cut mid-way, slow streams. It records what
it received and when a caller went away, so tests can check routing and cancellation.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from aiohttp import web

from spillway.nodes.managed import free_loopback_port

Mode = Literal["ok", "status", "stall", "cut", "slow", "interrupted"]


@dataclass
class Script:
    mode: Mode = "ok"
    status: int = 500
    error_message: str = "upstream exploded"
    retry_after: str | None = None
    chunks: int = 4  # content chunks per stream
    cut_after: int = 2  # chunks sent before a "cut"
    delay_s: float = 0.05  # between chunks in "slow" mode
    send_usage: bool = True  # False: behave like llama-cpp-python (no usage on streams)
    latency_s: float = 0.0  # service time before the answer (or the first chunk)
    #: the prompt tokens its usage reports; None: 7 for a chat, 2 for embeddings
    prompt_tokens: int | None = None
    #: answer a chat with its last message's content ("echo: …"), so each answer can be
    #: matched to its own request
    echo: bool = False


@dataclass
class Received:
    body: dict[str, Any]
    headers: dict[str, str]
    #: time.monotonic() when it arrived
    at: float = field(default_factory=time.monotonic)


@dataclass
class FakeUpstream:
    name: str
    script: Script = field(default_factory=Script)
    received: list[Received] = field(default_factory=list)
    cancelled_at: list[float] = field(default_factory=list)
    in_flight: int = 0
    #: the most requests it has had in flight at once
    peak_in_flight: int = 0
    port: int = 0
    #: served at GET /metrics (Prometheus text), None for a 404 like an engine without metrics
    metrics_text: str | None = None
    #: serve HTTPS with this context (base_url then says https://)
    tls: ssl.SSLContext | None = None
    #: the address to listen on (and to name in base_url)
    host: str = "127.0.0.1"
    _runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{self.host}:{self.port}/v1"

    @property
    def calls(self) -> int:
        return len(self.received)

    async def start(self) -> FakeUpstream:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)
        # shutdown_timeout=0: stop() is a crash, not a drain, and in-flight calls are cut.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.tls)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        """Stop listening (the port refuses connections until ``start`` again reuses it)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.metrics_text is None:
            raise web.HTTPNotFound()
        return web.Response(text=self.metrics_text, content_type="text/plain")

    async def _models(self, request: web.Request) -> web.Response:
        data = [{"id": f"{self.name}-model", "object": "model", "owned_by": "fake"}]
        return web.json_response({"object": "list", "data": data})

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.received.append(Received(body, dict(request.headers)))
        if self.script.mode == "status":
            return self._error()
        if self.script.latency_s:
            await asyncio.sleep(self.script.latency_s)
        vector = [0.1, 0.2, 0.3]
        data = [{"object": "embedding", "index": 0, "embedding": vector}]
        prompt = self._prompt_tokens(2)
        usage = {"prompt_tokens": prompt, "total_tokens": prompt}
        return web.json_response(
            {"object": "list", "data": data, "model": body["model"], "usage": usage}
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(Received(body, dict(request.headers)))
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            return await self._answer(request, body)
        except asyncio.CancelledError:
            self.cancelled_at.append(time.monotonic())
            raise
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        mode = self.script.mode
        if mode == "status":
            return self._error()
        if mode == "stall":
            await asyncio.sleep(3600)
        if self.script.latency_s:
            await asyncio.sleep(self.script.latency_s)
        if not body.get("stream"):
            return await self._complete(request, body)
        return await self._stream(request, body)

    def _error(self) -> web.Response:
        status = self.script.status
        kind = "invalid_request_error" if status < 500 and status != 429 else "server_error"
        envelope = {
            "error": {"message": self.script.error_message, "type": kind, "param": None,
                      "code": None}
        }  # fmt: skip
        headers = {"Retry-After": self.script.retry_after} if self.script.retry_after else {}
        return web.json_response(envelope, status=status, headers=headers)

    async def _complete(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        text = "".join(self._pieces())
        if self.script.echo:
            text = f"echo: {body['messages'][-1]['content']}"
        answer = {
            "id": f"chatcmpl-{self.name}",
            "object": "chat.completion",
            "created": 1_800_000_000,
            "model": body["model"],
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": self._prompt_tokens(7),
                      "completion_tokens": self.script.chunks,
                      "total_tokens": self._prompt_tokens(7) + self.script.chunks},
        }  # fmt: skip
        payload = orjson.dumps(answer)
        if self.script.mode != "cut":
            return web.Response(body=payload, content_type="application/json")
        # Promise the whole body, send half, then drop the connection.
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(payload)
        await response.prepare(request)
        await response.write(payload[: len(payload) // 2])
        _abort(request)
        return response

    async def _stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        options = body.get("stream_options") or {}
        with_usage = bool(options.get("include_usage")) and self.script.send_usage
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        pieces = self._pieces()
        deltas = [{"role": "assistant", "content": ""}] + [{"content": p} for p in pieces]
        for i, delta in enumerate(deltas):
            if self.script.mode == "cut" and i == self.script.cut_after:
                _abort(request)
                return response
            if self.script.mode == "interrupted" and i == self.script.cut_after:
                # llama-cpp-python's interrupt_requests: a bare [DONE], no finish_reason.
                await response.write(b"data: [DONE]\n\n")
                return response
            if self.script.mode == "slow" and i > 0:
                await asyncio.sleep(self.script.delay_s)
            await response.write(self._chunk(body, delta, None, with_usage))
        await response.write(self._chunk(body, {}, "stop", with_usage))
        if with_usage:
            prompt = self._prompt_tokens(7)
            usage = {"prompt_tokens": prompt, "completion_tokens": len(pieces),
                     "total_tokens": prompt + len(pieces)}  # fmt: skip
            final = self._chunk_payload(body, None, None, False)
            final["choices"], final["usage"] = [], usage
            await response.write(b"data: " + orjson.dumps(final) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _prompt_tokens(self, default: int) -> int:
        return default if self.script.prompt_tokens is None else self.script.prompt_tokens

    def _pieces(self) -> list[str]:
        return [f"{self.name}-{i} " for i in range(self.script.chunks)]

    def _chunk(
        self, body: dict[str, Any], delta: dict[str, Any], finish: str | None, usage: bool
    ) -> bytes:
        return b"data: " + orjson.dumps(self._chunk_payload(body, delta, finish, usage)) + b"\n\n"

    def _chunk_payload(
        self, body: dict[str, Any], delta: dict[str, Any] | None, finish: str | None, usage: bool
    ) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": f"chatcmpl-{self.name}",
            "object": "chat.completion.chunk",
            "created": 1_800_000_000,
            "model": body["model"],
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if usage:
            chunk["usage"] = None  # as OpenAI does on every chunk when usage was asked for
        return chunk


def _abort(request: web.Request) -> None:
    """Drop the TCP connection without a proper end, like a crashed or reset node."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def closed_port() -> int:
    """A loopback port with nothing listening (connection refused)."""
    return free_loopback_port()  # bound for a moment, then released


@asynccontextmanager
async def fake_nodes(*names: str) -> AsyncIterator[dict[str, FakeUpstream]]:
    """Started fake nodes by name, stopped at the end."""
    ups = {name: await FakeUpstream(name).start() for name in names}
    try:
        yield ups
    finally:
        for up in ups.values():
            await up.stop()
