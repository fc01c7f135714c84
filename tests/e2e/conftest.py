"""Real parts: `spillway serve` as a process, real llama.cpp nodes, the real openai SDK."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from spillway.config.defaults import CLOUD_PROVIDERS
from spillway.nodes.managed import default_model_path, free_loopback_port

SPILLWAY = Path(sys.executable).with_name("spillway")


free_port = free_loopback_port
#: For tests that compare what the node itself does (a cache hit would answer instead).
NO_CACHE = {"x-spillway-cache": "off"}


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without cloud keys or a config path, so tests never reach the cloud."""
    drop = {p.key_env for p in CLOUD_PROVIDERS} | {"SPILLWAY_CONFIG"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra)
    return env


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0)

    def aclient(self, api_key: str = "unused") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=api_key, max_retries=0)


def start_gateway(workdir: Path, *args: str) -> Gateway:
    """`spillway serve` in ``workdir`` (no ./spillway.toml there unless a test puts one)."""
    port = free_port()
    log = workdir / "spillway.log"
    cmd = [str(SPILLWAY), "serve", "--port", str(port), "--data-dir", str(workdir / "data")]
    proc = subprocess.Popen(
        [*cmd, *args],
        cwd=workdir,
        env=clean_env(),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
    except RuntimeError:
        stop(proc)
        raise RuntimeError(log.read_text()) from None
    return Gateway(proc, port, log)


@pytest.fixture(scope="session")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The embedded default, exactly as `make run` starts it: no config, no keys."""
    gateway = start_gateway(tmp_path_factory.mktemp("embedded"))
    yield gateway
    stop(gateway.proc)


@pytest.fixture(scope="session")
def llama_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A plain llama-cpp-python server (not managed by spillway); yields its /v1 URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "llama.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(default_model_path())]
    cmd += ["--model_alias", "smollm2", "--port", str(port), "--n_ctx", "2048"]
    proc = subprocess.Popen(cmd, env=clean_env(), stdout=log.open("wb"), stderr=subprocess.STDOUT)
    wait_ready(f"http://127.0.0.1:{port}/v1/models", proc)
    yield f"http://127.0.0.1:{port}/v1"
    stop(proc)
