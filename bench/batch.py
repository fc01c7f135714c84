"""Batch jobs, measured: throughput against the embedded llama.cpp node, what the seed's
prompt-gluing loses, and the gateway's memory over a 200,000-line batch.

    .venv/bin/python bench/batch.py                  # all three (about 15 minutes on 2 cores)
    .venv/bin/python bench/batch.py --only memory    # throughput | gluing | memory

1. **Throughput.** ``--lines`` chat lines (each asks the model to repeat a code word), at
   temperature 0 with ``--tokens`` output tokens, sent straight to llama-cpp-python's server
   on SmolLM2-135M at concurrency 1, 2 and 4; the best of those is the node's best
   concurrency. Then the same lines as one batch through ``spillway serve`` (the node's
   ``max_concurrency`` set to that best, ``[batch] max_share = 1``: an idle fleet), timed from
   the batch's creation to its completion. Target: at least 0.95 of the direct figure.
2. **Gluing.** The seed's "batch optimizer": ``--glue`` prompts joined into one request,
   the model asked to answer each in turn separated by ``---``, the answer split on ``---``.
   Counted: answers lost (fewer parts than prompts), extra parts, and parts that carry
   another prompt's code word (mis-assigned); the batch run's lines are counted the same way.
   Then interactive latency (p50 of ``--interactive`` requests one after another) with the
   node idle and while a batch runs at the default ``max_share`` on the node set up as the
   embedded default is (``max_concurrency = 1``) (target: within 1.5x). ``--only
   interactive`` runs this part alone.
3. **Memory.** A 200,000-line batch against a fixed-reply upstream; the spillway process's
   RSS (``/proc/PID/status``) sampled every 0.5 s from before the upload to the end.
   Target: growth under 50 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson

from spillway.nodes.managed import default_model_path, free_loopback_port

SPILLWAY = Path(sys.executable).with_name("spillway")
WORDS = ("amber", "birch", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "indigo",
         "juniper", "kestrel", "lagoon", "meadow", "nimbus", "onyx", "pepper")  # fmt: skip


def code_word(i: int) -> str:
    return f"{WORDS[i % len(WORDS)]}-{i}"


def prompt(i: int) -> str:
    return f"Repeat exactly, and nothing else: {code_word(i)}"


def body(i: int, tokens: int) -> dict[str, Any]:
    return {"model": "m", "temperature": 0, "max_tokens": tokens,
            "messages": [{"role": "user", "content": prompt(i)}]}  # fmt: skip


@contextmanager
def process(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[int]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


async def wait_for(url: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() < deadline:
            try:
                if (await http.get(url)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not answer")


@contextmanager
def llama_node(scratch: Path) -> Iterator[str]:
    port = free_loopback_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(default_model_path()),
           "--model_alias", "m", "--port", str(port), "--n_threads", str(os.cpu_count() or 1),
           "--n_ctx", "2048"]  # fmt: skip
    with process(cmd, scratch / "llama.log"):
        yield f"http://127.0.0.1:{port}/v1"


def spillway_config(scratch: Path, node_url: str, concurrency: int, share: float) -> Path:
    path = scratch / "spillway.toml"
    path.write_text(
        f"""
[cache]
mode = "off"
[batch]
max_share = {share}
poll_s = 0.5
[nodes.node]
kind = "private"
base_url = "{node_url}"
models = {{ m = "m" }}
max_concurrency = {concurrency}
load_signal = "none"
"""
    )
    return path


@contextmanager
def spillway(scratch: Path, config: Path) -> Iterator[tuple[str, int]]:
    port = free_loopback_port()
    cmd = [str(SPILLWAY), "serve", "--config", str(config), "--port", str(port),
           "--data-dir", str(scratch / f"data-{port}")]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.endswith("_PROXY")}
    with process(cmd, scratch / f"spillway-{port}.log", env) as pid:
        yield f"http://127.0.0.1:{port}", pid


async def direct(node_url: str, lines: int, tokens: int, concurrency: int) -> float:
    """Lines per second, ``concurrency`` clients sharing the lines."""
    queue = list(range(lines))
    async with httpx.AsyncClient(base_url=node_url, timeout=600) as http:

        async def client() -> None:
            while queue:
                i = queue.pop()
                (await http.post("/chat/completions", json=body(i, tokens))).raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return lines / (time.perf_counter() - started)


async def run_batch(url: str, lines: list[bytes]) -> tuple[float, list[dict[str, Any]]]:
    """(lines per second from creation to completion, the output lines)."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=3)
    uploaded = await client.files.create(file=("in.jsonl", b"\n".join(lines)), purpose="batch")
    started = time.perf_counter()
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        await asyncio.sleep(0.25)
        batch = await client.batches.retrieve(batch.id)
    took = time.perf_counter() - started
    assert batch.status == "completed", batch
    output = await client.files.content(batch.output_file_id) if batch.output_file_id else None
    rows = [orjson.loads(x) for x in output.text.splitlines()] if output else []
    await client.close()
    return len(lines) / took, rows


def verdict(i: int, text: str, size: int) -> str:
    """``own_word`` within the group of ``size`` that line ``i`` would be glued into: the
    same test the glued answers get."""
    start = i - i % size
    return own_word(i, text, range(start, start + size))


def own_word(i: int, text: str, group: range) -> str:
    """``own``: the part carries its own code word; ``other``: another prompt's of the
    group (a whole word: "birch-1" is not found in "birch-17"); ``none``."""
    words = set(re.findall(r"[a-z]+-\d+", text.lower()))
    if code_word(i) in words:
        return "own"
    return "other" if any(code_word(j) in words for j in group if j != i) else "none"


async def throughput(scratch: Path, options: argparse.Namespace) -> dict[str, Any]:
    with llama_node(scratch) as node_url:
        await wait_for(node_url + "/models")
        await direct(node_url, 4, options.tokens, 1)  # warm-up
        rates = {c: await direct(node_url, options.lines, options.tokens, c) for c in (1, 2, 4)}
        best = max(rates, key=lambda c: rates[c])
        print(f"direct: {', '.join(f'c={c} {r:.2f} lines/s' for c, r in rates.items())}")
        config = spillway_config(scratch, node_url, best, 1.0)
        lines = [orjson.dumps({"custom_id": f"l{i}", "method": "POST",
                               "url": "/v1/chat/completions", "body": body(i, options.tokens)})
                 for i in range(options.lines)]  # fmt: skip
        with spillway(scratch, config) as (url, _):
            await wait_for(url + "/readyz")
            rate, rows = await run_batch(url, lines)
        interactive = await yielding(scratch, node_url, lines, options)
        verdicts = [verdict(int(r["custom_id"][1:]), _text(r["response"]["body"]), options.glue)
                    for r in rows]  # fmt: skip
        gluing = await glued(node_url, options) if options.only in (None, "gluing") else {}
    result = {
        "direct": {str(c): r for c, r in rates.items()},
        "best_concurrency": best,
        "batch_lines_per_s": rate,
        "ratio": rate / rates[best],
        "batch_answers": len(rows),
        "batch_own_word": verdicts.count("own"),
        "batch_other_word": verdicts.count("other"),
        "gluing": gluing,
        "interactive": interactive,
    }
    print(f"batch: {rate:.2f} lines/s = {rate / rates[best]:.3f}x direct at c={best}; "
          f"{len(rows)} answers, {verdicts.count('own')} carry their own code word, "
          f"{verdicts.count('other')} another line's")  # fmt: skip
    return result


async def yielding(
    scratch: Path, node_url: str, lines: list[bytes], options: argparse.Namespace
) -> dict[str, Any]:
    """Interactive latency with the node idle, then while a batch runs on it at the default
    ``max_share``: p50 of ``--interactive`` requests, one after another. The node is set up
    as the embedded default sets it up, ``max_concurrency = 1``: llama-cpp-python's server
    answers one request at a time, so more would only queue inside it, where spillway cannot
    put interactive requests first."""
    config = spillway_config(scratch, node_url, 1, 0.5)
    with spillway(scratch, config) as (url, _):
        await wait_for(url + "/readyz")
        async with httpx.AsyncClient(base_url=url + "/v1", timeout=600) as http:

            async def p50(offset: int) -> float:
                took = []
                for i in range(options.interactive):
                    started = time.perf_counter()
                    answer = await http.post("/chat/completions",
                                             json=body(offset + i, options.tokens))  # fmt: skip
                    answer.raise_for_status()
                    took.append(time.perf_counter() - started)
                return sorted(took)[len(took) // 2]

            idle = await p50(100_000)
            running = asyncio.create_task(run_batch(url, lines))
            await asyncio.sleep(2)  # the batch has started
            before = await _batch_done(http)
            busy = await p50(200_000)
            during = await _batch_done(http) - before
            running.cancel()
    print(f"interactive p50: idle {idle * 1000:.0f} ms, with a batch running "
          f"{busy * 1000:.0f} ms ({busy / idle:.2f}x); the batch finished {during} lines "
          f"meanwhile")  # fmt: skip
    return {"idle_p50_s": idle, "busy_p50_s": busy, "ratio": busy / idle, "batch_lines": during}


async def _batch_done(http: httpx.AsyncClient) -> int:
    """Lines the newest batch has finished."""
    page = (await http.get("/batches?limit=1")).json()
    counts = page["data"][0]["request_counts"] if page["data"] else {}
    return int(counts.get("completed", 0)) + int(counts.get("failed", 0))


async def interactive_only(scratch: Path, options: argparse.Namespace) -> dict[str, Any]:
    with llama_node(scratch) as node_url:
        await wait_for(node_url + "/models")
        await direct(node_url, 4, options.tokens, 1)  # warm-up
        lines = [orjson.dumps({"custom_id": f"l{i}", "method": "POST",
                               "url": "/v1/chat/completions", "body": body(i, options.tokens)})
                 for i in range(options.lines)]  # fmt: skip
        return await yielding(scratch, node_url, lines, options)


async def glued(node_url: str, options: argparse.Namespace) -> dict[str, int]:
    size = options.glue
    counts = {"prompts": 0, "lost": 0, "extra": 0, "own": 0, "other": 0, "none": 0}
    async with httpx.AsyncClient(base_url=node_url, timeout=600) as http:
        for start in range(0, options.lines, size):
            group = range(start, min(start + size, options.lines))
            text = "\n---\n".join(prompt(i) for i in group)
            request = {
                "model": "m", "temperature": 0, "max_tokens": options.tokens * len(group),
                "messages": [{"role": "user", "content":
                              "Answer each request below in order, separating the answers "
                              f"with a line of three dashes (---).\n\n{text}"}],
            }  # fmt: skip
            reply = (await http.post("/chat/completions", json=request)).json()
            parts = [p for p in _text(reply).split("---") if p.strip()]
            counts["prompts"] += len(group)
            counts["lost"] += max(0, len(group) - len(parts))
            counts["extra"] += max(0, len(parts) - len(group))
            for i, part in zip(group, parts, strict=False):
                counts[own_word(i, part, group)] += 1
    print(f"gluing {size} prompts a request: {counts}")
    return counts


def _text(answer: dict[str, Any]) -> str:
    return str(answer["choices"][0]["message"]["content"] or "")


FIXED_UPSTREAM = """
import sys
from aiohttp import web
REPLY = (b'{"id":"x","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,'
         b'"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],'
         b'"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10}}')
async def chat(request):
    await request.read()
    return web.Response(body=REPLY, content_type="application/json")
async def models(request):
    return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})
app = web.Application()
app.router.add_post("/v1/chat/completions", chat)
app.router.add_get("/v1/models", models)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def memory(scratch: Path, options: argparse.Namespace) -> dict[str, Any]:
    port = free_loopback_port()
    script = scratch / "fixed_upstream.py"
    script.write_text(FIXED_UPSTREAM)
    with process([sys.executable, str(script), str(port)], scratch / "upstream.log"):
        node_url = f"http://127.0.0.1:{port}/v1"
        await wait_for(node_url + "/models")
        config = spillway_config(scratch, node_url, 32, 0.5)
        with spillway(scratch, config) as (url, pid):
            await wait_for(url + "/readyz")
            async with httpx.AsyncClient(base_url=url + "/v1", timeout=30) as http:
                for _ in range(200):  # warm the process up
                    await http.post("/chat/completions", json=body(0, 4))
            await asyncio.sleep(1)
            baseline = rss_mb(pid)
            samples: list[float] = []
            stop = asyncio.Event()

            async def sample() -> None:
                while not stop.is_set():
                    samples.append(rss_mb(pid))
                    await asyncio.sleep(0.5)

            sampler = asyncio.create_task(sample())
            lines = [orjson.dumps({"custom_id": f"m{i}", "method": "POST",
                                   "url": "/v1/chat/completions", "body": body(i, 4)})
                     for i in range(options.memory_lines)]  # fmt: skip
            rate, rows = await run_batch(url, lines)
            del lines
            stop.set()
            await sampler
    peak = max(samples)
    result = {"lines": options.memory_lines, "baseline_mb": baseline, "peak_mb": peak,
              "growth_mb": peak - baseline, "lines_per_s": rate, "answers": len(rows)}  # fmt: skip
    print(f"memory: {options.memory_lines} lines at {rate:.0f} lines/s; RSS {baseline:.1f} MB "
          f"before, {peak:.1f} MB at most: growth {peak - baseline:.1f} MB")  # fmt: skip
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=12)
    parser.add_argument("--glue", type=int, default=10)
    parser.add_argument("--interactive", type=int, default=30)
    parser.add_argument("--memory-lines", type=int, default=200_000)
    parser.add_argument(
        "--only", choices=["throughput", "gluing", "memory", "interactive"], default=None
    )
    options = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="spillway-batch-bench-") as scratch:
        if options.only in (None, "throughput", "gluing"):
            results["throughput"] = await throughput(Path(scratch), options)
        if options.only == "interactive":
            results["interactive"] = await interactive_only(Path(scratch), options)
        if options.only in (None, "memory"):
            results["memory"] = await memory(Path(scratch), options)
    print(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    asyncio.run(main())
