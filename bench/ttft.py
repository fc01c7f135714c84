"""Time to first token on streams: N sequential streaming chat completions over one kept-alive
connection; for each, the time from sending the request to reading the first SSE ``data:`` line.
Each stream is read to the end and must finish with ``data: [DONE]``.

Prints one JSON object: n, errors, p50_ms, p90_ms, p99_ms, mean_ms, max_ms (and the first error,
if any).

    python bench/ttft.py --url http://127.0.0.1:9000/v1/chat/completions --model bench -n 300
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import orjson
import uvloop
from aiohttp import ClientSession, ClientTimeout, TCPConnector


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


async def one_stream(
    session: ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> float:
    start = time.perf_counter()
    first: float | None = None
    done = False
    async with session.post(url, data=body, headers=headers) as response:
        if response.status != 200:
            text = (await response.read())[:200].decode(errors="replace")
            raise RuntimeError(f"HTTP {response.status}: {text}")
        async for line in response.content:
            if first is None and line.startswith(b"data:"):
                first = time.perf_counter()
            if line.rstrip() == b"data: [DONE]":
                done = True
    if first is None or not done:
        raise RuntimeError("stream ended without a data line or without data: [DONE]")
    return first - start


async def measure(args: argparse.Namespace) -> dict[str, object]:
    body = orjson.dumps(
        {
            "model": args.model,
            "messages": [
                {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
                {"role": "user", "content": "What is the capital of France? One sentence."},
            ],
            "max_tokens": 64,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    headers = {"Content-Type": "application/json"}
    if args.key:
        headers["Authorization"] = f"Bearer {args.key}"
    samples: list[float] = []
    errors = 0
    first_error = ""
    connector = TCPConnector(limit=1)
    async with ClientSession(connector=connector, timeout=ClientTimeout(total=30)) as session:
        for i in range(args.warmup + args.n):
            try:
                elapsed = await one_stream(session, args.url, body, headers)
            except Exception as exc:
                errors += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"
                continue
            if i >= args.warmup:
                samples.append(elapsed * 1000)
    result: dict[str, object] = {"n": len(samples), "errors": errors}
    if first_error:
        result["first_error"] = first_error
    if samples:
        samples.sort()
        result |= {
            "p50_ms": percentile(samples, 0.50),
            "p90_ms": percentile(samples, 0.90),
            "p99_ms": percentile(samples, 0.99),
            "mean_ms": statistics.fmean(samples),
            "max_ms": samples[-1],
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the chat completions URL")
    parser.add_argument("--model", default="bench-stream")
    parser.add_argument("--key", default="", help="Bearer key (none when empty)")
    parser.add_argument("-n", type=int, default=300, help="measured requests")
    parser.add_argument("--warmup", type=int, default=20, help="requests run first, not counted")
    args = parser.parse_args()
    print(json.dumps(uvloop.run(measure(args))))


if __name__ == "__main__":
    main()
