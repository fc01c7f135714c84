"""Replay the hostile-upstream cases of issue #17 against a `spillway serve`, and print the
gateway's memory and what the attack did to other clients. Load-free: one attack at a time,
one client in the background, no wrk.

    .venv/bin/python bench/hostile_upstream.py                   # every case, this checkout
    .venv/bin/python bench/hostile_upstream.py --src /tmp/old/src --case huge gzip

This script is the attacker: it serves the hostile nodes itself (aiohttp, loopback) and
starts the gateway in its own process (``spillway serve`` through ``python -c``, with
``PYTHONPATH=--src`` so an older checkout can be measured with the same venv). Cases:

- ``failover``: two private nodes answer 500 and requests with a 1 MiB prompt fall back to
  a cloud node; then ordinary requests. RSS before, after, and after the ordinary traffic.
- ``huge``: a node answers 200 with ``Content-Length: 10 GiB`` and sends zeros as fast as
  the gateway reads (up to ``--huge-mib``). Peak RSS, what the client got, bytes sent.
- ``gzip``: a node answers a 200 whose ``Content-Encoding: gzip`` body inflates ~1000:1
  (``--gzip-mib`` inflated). Peak RSS and what the client got.
- ``sse``: a node streams ``data: `` and then ``--sse-mib`` of bytes with no newline. The
  gateway's CPU time and how long the stream took.
- ``budget``: a key with a 0.05 USD budget against a priced node that bills honestly for
  what it is sent: token-array embeddings (50 concurrent), a 1 MiB ``tools`` array (2
  requests), and ``max_tokens`` larger than ``max_completion_tokens`` (2 requests). How
  many were admitted and what the node billed.

Every case also reports the latency of another client asking a healthy model meanwhile
(p50 / max, against its latency before the attack).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import procs
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-key-0000000000"
#: one budgeted key per budget attack, so that each starts from an unspent budget
BUDGET_KEYS = [f"bench-budget-key-{i}-0000" for i in range(3)]
PRICE_IN, PRICE_OUT = Decimal("10"), Decimal("30")  # USD per million tokens, the billing node
BUDGET = Decimal("0.05")
CASES = ("failover", "huge", "gzip", "sse", "budget")


def completion(content: str, usage: tuple[int, int] = (10, 5)) -> dict[str, Any]:
    return {
        "id": "chatcmpl-hostile", "object": "chat.completion", "created": int(time.time()),
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                  "total_tokens": sum(usage)},
    }  # fmt: skip


class Hostile:
    """The nodes: /ok (healthy), /fail (500), /huge, /gzip, /sse, /bill (honest billing)."""

    def __init__(self, huge_bytes: int, gzip_bytes: int, sse_bytes: int):
        self.huge_bytes, self.sse_bytes = huge_bytes, sse_bytes
        self.bomb = _gzip_bomb(gzip_bytes)
        self.sent: dict[str, int] = {}
        self.billed = Decimal(0)
        self.admitted: dict[str, int] = {}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        routes = {
            "ok": self.ok, "fail": self.fail, "huge": self.huge, "gzip": self.gzip,
            "sse": self.sse, "bill": self.bill,
        }  # fmt: skip
        for name, handler in routes.items():
            app.router.add_post(f"/{name}/v1/chat/completions", handler)
            app.router.add_post(f"/{name}/v1/embeddings", handler)
            app.router.add_get(f"/{name}/v1/models", self.models)
        return app

    async def models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    async def ok(self, request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(completion("fine"))

    async def fail(self, request: web.Request) -> web.Response:
        await request.read()
        error = {"error": {"message": "node exploded", "type": "server_error"}}
        return web.json_response(error, status=500)

    async def huge(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = 10 * 1024**3
        await response.prepare(request)
        return await self._pour(request, response, "huge", self.huge_bytes)

    async def gzip(self, request: web.Request) -> web.Response:
        await request.read()
        self.sent["gzip"] = len(self.bomb)
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        return web.Response(body=self.bomb, headers=headers)

    async def sse(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: ")
        return await self._pour(request, response, "sse", self.sse_bytes, fill=b"x")

    async def bill(self, request: web.Request) -> web.Response:
        """Bill as a provider would: every input token it was sent, every output it may make."""
        raw = await request.read()
        body = json.loads(raw)
        kind = "embeddings" if request.path.endswith("/embeddings") else "chat"
        self.admitted[kind] = self.admitted.get(kind, 0) + 1
        if kind == "embeddings":
            prompt, output = _input_tokens(body["input"]), 0
        else:
            prompt = len(raw) // 4  # tools, messages, everything the model reads
            output = max(body.get("max_tokens") or 0, body.get("max_completion_tokens") or 0)
        self.billed += (prompt * PRICE_IN + output * PRICE_OUT) / 1_000_000
        if kind == "embeddings":
            data = [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}]
            usage = {"prompt_tokens": prompt, "total_tokens": prompt}
            return web.json_response({"object": "list", "data": data, "usage": usage})
        return web.json_response(completion("x", (prompt, output)))

    async def _pour(
        self, request: web.Request, response: web.StreamResponse, case: str, total: int,
        fill: bytes = b"\0",
    ) -> web.StreamResponse:  # fmt: skip
        block, sent = fill * (256 * 1024), 0
        try:
            while sent < total:
                await response.write(block)
                sent += len(block)
                self.sent[case] = sent
        except (ConnectionResetError, RuntimeError, OSError):
            pass  # the gateway hung up: the point of the exercise
        return response


def _input_tokens(value: Any) -> int:
    if isinstance(value, int):
        return 1
    if isinstance(value, str):
        return max(1, len(value.encode()) // 4)
    return sum(_input_tokens(v) for v in value)


def _gzip_bomb(inflated: int) -> bytes:
    """A JSON chat.completion whose content is ``inflated`` bytes of 'a', gzipped."""
    head, tail = json.dumps(completion("@")).encode().split(b"@")
    out = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts, block = [out.compress(head)], b"a" * (4 * 1024 * 1024)
    for _ in range(inflated // len(block)):
        parts.append(out.compress(block))
    parts += [out.compress(tail), out.flush()]
    return b"".join(parts)


def gateway_config(upstream: str, data_dir: Path) -> str:
    def node(kind: str, path: str, model: str, extra: str = "") -> str:
        return (f'kind = "{kind}"\nbase_url = "{upstream}/{path}/v1"\n'
                f'models = {{ {model} = "m" }}\n{extra}')  # fmt: skip

    price = f"price = {{ input_per_mtok = {PRICE_IN}, output_per_mtok = {PRICE_OUT} }}\n"
    short = "timeouts = { total_s = 30.0, idle_s = 10.0 }\n"
    return "\n".join([
        f'[server]\ndata_dir = "{data_dir}"\n',
        f'[[keys]]\nkey = "{KEY}"\ntenant = "other"\n',
        *(f'[[keys]]\nkey = "{key}"\ntenant = "budgeted"\n'
          f'budget = {{ amount = {BUDGET}, currency = "USD", period = "day" }}\n'
          for key in BUDGET_KEYS),
        "[nodes.healthy]\n" + node("cloud", "ok", "ok"),
        "[nodes.p1]\n" + node("private", "fail", "fail"),
        "[nodes.p2]\n" + node("private", "fail", "fail"),
        "[nodes.spill]\n" + node("cloud", "ok", "fail"),
        "[nodes.huge]\n" + node("private", "huge", "huge", short),
        "[nodes.gzip]\n" + node("private", "gzip", "gzip", short),
        "[nodes.sse]\n" + node("private", "sse", "sse", short),
        "[nodes.bill]\n" + node("cloud", "bill", "bill", price),
    ])  # fmt: skip


class Gateway:
    def __init__(self, proc: procs.Proc, url: str):
        self.proc, self.url = proc, url

    def rss_mb(self) -> float:
        return procs.memory(self.proc.pid).rss_mb

    def cpu_s(self) -> float:
        return procs.tree_ticks(self.proc.pid) / os.sysconf("SC_CLK_TCK")


async def start_gateway(src: Path, upstream: str, workdir: Path) -> Gateway:
    config = workdir / "spillway.toml"
    config.write_text(gateway_config(upstream, workdir / "data"))
    port = procs.free_port()
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(PYTHONPATH=str(src), HF_HUB_OFFLINE="1")
    entry = "from spillway.cli.main import main; main()"
    argv = [sys.executable, "-c", entry, "serve", "--config", str(config), "--port", str(port)]
    proc = procs.start("gateway", argv, workdir, env)
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            try:
                async with http.get(url + "/healthz") as r:
                    if r.status == 200:
                        return Gateway(proc, url)
            except aiohttp.ClientError:
                pass
            if not proc.alive():
                break
            await asyncio.sleep(0.1)
    raise RuntimeError("gateway did not start:\n" + proc.log_tail())


async def post(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], key: str = KEY,
    path: str = "/v1/chat/completions",
) -> tuple[int, int]:  # fmt: skip
    """(status, bytes of the answer), reading the answer as it comes."""
    headers = {"Authorization": f"Bearer {key}"}
    try:
        async with http.post(url + path, json=body, headers=headers) as r:
            size = 0
            async for chunk in r.content.iter_any():
                size += len(chunk)
            return r.status, size
    except (aiohttp.ClientError, TimeoutError) as exc:
        return -1, len(type(exc).__name__)


class Bystander:
    """Another client asking the healthy model once every 50 ms; its latencies in ms."""

    def __init__(self, url: str):
        self.url, self.latencies, self.failures = url, [], 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Bystander:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()

    async def _run(self) -> None:
        body = {"model": "ok", "messages": [{"role": "user", "content": "hi"}]}
        async with aiohttp.ClientSession() as http:
            while True:
                started = time.perf_counter()
                status, _ = await post(http, self.url, body)
                self.latencies.append(1000 * (time.perf_counter() - started))
                self.failures += status != 200
                await asyncio.sleep(0.05)

    def summary(self) -> str:
        if not self.latencies:
            return "no requests completed"
        p50 = statistics.median(self.latencies)
        return (f"other client: {len(self.latencies)} requests, p50 {p50:.1f} ms, "
                f"max {max(self.latencies):.0f} ms, {self.failures} failed")  # fmt: skip


async def watch_rss(gateway: Gateway, until: Awaitable[Any]) -> tuple[Any, float]:
    """Run ``until`` while sampling RSS every 20 ms: (its result, peak RSS MB)."""
    task, peak = asyncio.ensure_future(until), gateway.rss_mb()
    while not task.done():
        peak = max(peak, gateway.rss_mb())
        await asyncio.sleep(0.02)
    return task.result(), max(peak, gateway.rss_mb())


async def case_failover(gw: Gateway, hostile: Hostile, args: argparse.Namespace) -> None:
    prompt = "x" * (1024 * 1024)
    before = gw.rss_mb()
    statuses: dict[int, int] = {}
    async with aiohttp.ClientSession() as http:
        gate = asyncio.Semaphore(4)

        async def one() -> None:
            async with gate:
                body = {"model": "fail", "messages": [{"role": "user", "content": prompt}]}
                status, _ = await post(http, gw.url, body)
                statuses[status] = statuses.get(status, 0) + 1

        await asyncio.gather(*(one() for _ in range(args.failover_requests)))
        after = gw.rss_mb()
        ordinary = {"model": "ok", "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(args.ordinary_requests):
            await post(http, gw.url, ordinary)
    print(f"  {args.failover_requests} failed-over 1 MiB requests (statuses {statuses}): "
          f"RSS {before:.0f} -> {after:.0f} MB; after {args.ordinary_requests} ordinary "
          f"requests {gw.rss_mb():.0f} MB")  # fmt: skip


async def case_huge(gw: Gateway, hostile: Hostile, _args: argparse.Namespace) -> None:
    await one_big_answer(gw, hostile, "huge", stream=False)


async def case_gzip(gw: Gateway, hostile: Hostile, _args: argparse.Namespace) -> None:
    await one_big_answer(gw, hostile, "gzip", stream=False)


async def case_sse(gw: Gateway, hostile: Hostile, _args: argparse.Namespace) -> None:
    cpu = gw.cpu_s()
    await one_big_answer(gw, hostile, "sse", stream=True)
    print(f"  gateway CPU during the case: {gw.cpu_s() - cpu:.1f} s")


async def one_big_answer(gw: Gateway, hostile: Hostile, model: str, stream: bool) -> None:
    before = gw.rss_mb()
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    started = time.perf_counter()
    async with Bystander(gw.url) as other, aiohttp.ClientSession(auto_decompress=False) as http:
        (status, size), peak = await watch_rss(gw, post(http, gw.url, body))
    took = time.perf_counter() - started
    sent = hostile.sent.get(model, 0)
    print(f"  client got {status} with {size / 2**20:.1f} MiB after {took:.1f} s; node sent "
          f"{sent / 2**20:.1f} MiB; RSS {before:.0f} MB, peak {peak:.0f} MB")  # fmt: skip
    print(f"  {other.summary()}")


async def case_budget(gw: Gateway, hostile: Hostile, _args: argparse.Namespace) -> None:
    arrays = [[1] * 8000] * 16  # 128,000 tokens per request, as token arrays
    tools = [{"type": "function", "function": {"name": f"f{i}", "description": "d" * 1000,
              "parameters": {"type": "object"}}} for i in range(1000)]  # fmt: skip
    chat = {"model": "bill", "messages": [{"role": "user", "content": "hi"}]}
    attacks: list[tuple[str, str, dict[str, Any], int]] = [
        ("embeddings, token arrays x50", "/v1/embeddings", {"model": "bill", "input": arrays}, 50),
        ("chat with 1 MiB of tools x2", "/v1/chat/completions",
         {**chat, "tools": tools, "max_tokens": 1}, 2),
        ("max_tokens 100000, max_completion_tokens 1 x2", "/v1/chat/completions",
         {**chat, "max_tokens": 100_000, "max_completion_tokens": 1}, 2),
    ]  # fmt: skip
    async with aiohttp.ClientSession() as http:
        for (label, path, body, count), key in zip(attacks, BUDGET_KEYS, strict=True):
            billed_before = hostile.billed
            results = await asyncio.gather(
                *(post(http, gw.url, body, key, path) for _ in range(count))
            )
            admitted = sum(status == 200 for status, _ in results)
            billed = hostile.billed - billed_before
            print(f"  {label}: {admitted}/{count} admitted, node billed {billed:.4f} USD "
                  f"against a {BUDGET} USD budget ({billed / BUDGET:.1f}x)")  # fmt: skip


RUNNERS: dict[str, Callable[[Gateway, Hostile, argparse.Namespace], Awaitable[None]]] = {
    "failover": case_failover, "huge": case_huge, "gzip": case_gzip, "sse": case_sse,
    "budget": case_budget,
}  # fmt: skip


async def main(args: argparse.Namespace) -> None:
    mib = 1024 * 1024
    hostile = Hostile(args.huge_mib * mib, args.gzip_mib * mib, args.sse_mib * mib)
    runner = web.AppRunner(hostile.app(), access_log=None)
    await runner.setup()
    port = procs.free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"gzip bomb: {len(hostile.bomb) / mib:.2f} MiB on the wire, {args.gzip_mib} MiB inflated")
    for case in args.case:
        with tempfile.TemporaryDirectory(prefix="hostile-") as scratch:
            gw = await start_gateway(args.src, f"http://127.0.0.1:{port}", Path(scratch))
            try:
                async with Bystander(gw.url) as calm:
                    await asyncio.sleep(1.0)
                print(f"{case}: gateway RSS {gw.rss_mb():.0f} MB at start; calm {calm.summary()}")
                await RUNNERS[case](gw, hostile, args)
            finally:
                procs.stop(gw.proc)
    await runner.cleanup()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="spillway's src dir")
    parser.add_argument("--case", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--failover-requests", type=int, default=600)
    parser.add_argument("--ordinary-requests", type=int, default=2000)
    parser.add_argument("--huge-mib", type=int, default=1536)
    parser.add_argument("--gzip-mib", type=int, default=1024)
    parser.add_argument("--sse-mib", type=int, default=20)
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
