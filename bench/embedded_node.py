"""Generation speed of the embedded node (llama-cpp-python's server on SmolLM2-135M) for one
or more llama.cpp builds, side by side, rounds interleaved.

Each build is a directory that holds an unpacked ``llama_cpp`` package (``unzip`` of a wheel),
or ``installed`` for the one in this environment. For each round and build: start the server,
warm it up with one request, then time ``--requests`` chat completions of ``--tokens`` tokens
at temperature 0 on a prompt that runs long, and report completion tokens
per second (median over rounds) and the AMX / AVX-512 instruction counts of ``libggml-cpu``.

    .venv/bin/python bench/embedded_node.py installed /tmp/native-build
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from spillway.nodes.managed import default_model_path, free_loopback_port

PROMPT = "Write a long story about a lighthouse keeper and the sea, in many paragraphs."
AMX = re.compile(r"\s(tileloadd\w*|tilestored|tilezero|tilerelease|ldtilecfg|sttilecfg|tdp\w+)\s")


def library(build: str) -> Path:
    if build == "installed":
        import llama_cpp

        return Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"
    return Path(build) / "llama_cpp" / "lib" / "libggml-cpu.so"


def instruction_counts(lib: Path) -> tuple[int, int]:
    objdump = shutil.which("objdump")
    if objdump is None:
        return -1, -1
    listing = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", str(lib.resolve())],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return len(AMX.findall(listing)), listing.count("%zmm")


def tokens_per_second(build: str, requests: int, tokens: int, threads: int) -> float:
    env = dict(os.environ)
    if build != "installed":
        env["PYTHONPATH"] = build + os.pathsep + env.get("PYTHONPATH", "")
    port = free_loopback_port()
    cmd = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(default_model_path()),
        "--model_alias", "m", "--port", str(port), "--n_threads", str(threads),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=300) as client:
            _wait(client, proc)
            _chat(client, 8)  # warm-up: the first pass pages the model in
            started, generated = time.perf_counter(), 0
            for _ in range(requests):
                generated += _chat(client, tokens)
            return generated / (time.perf_counter() - started)
    finally:
        proc.terminate()
        proc.wait(30)


def _wait(client: httpx.Client, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if client.get("/models").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server did not start")


def _chat(client: httpx.Client, tokens: int) -> int:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "temperature": 0,
    }
    reply = client.post("/chat/completions", json=body)
    reply.raise_for_status()
    completion: int = reply.json()["usage"]["completion_tokens"]
    return completion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("builds", nargs="+", help="'installed' or a dir with llama_cpp/")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    options = parser.parse_args()
    results: dict[str, list[float]] = {build: [] for build in options.builds}
    for round_ in range(options.rounds):
        for build in options.builds:
            rate = tokens_per_second(build, options.requests, options.tokens, options.threads)
            results[build].append(rate)
            print(f"round {round_ + 1}: {build}: {rate:.1f} tokens/s", flush=True)
    first = statistics.median(results[options.builds[0]])
    print("\n| build | AMX instructions | zmm uses | tokens/s (median) | vs first |")
    print("|---|--:|--:|--:|--:|")
    for build, rates in results.items():
        amx, zmm = instruction_counts(library(build))
        median = statistics.median(rates)
        print(f"| {build} | {amx} | {zmm} | {median:.1f} | {median / first:.2f}x |")


if __name__ == "__main__":
    main()
