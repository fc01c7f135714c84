"""`spillway serve` processes as replicas of one fleet, for the scale-out tests: started on a
port of their own (or the one they had, to restart), awaited until ready, stopped."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.e2e.conftest import SPILLWAY, clean_env, free_port


@dataclass
class Replica:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    config: Path
    workdir: Path
    port: int


def start(config: Path, workdir: Path, port: int | None = None) -> Replica:
    """`spillway serve --config CONFIG` with its data in ``workdir`` (kept across restarts)."""
    workdir.mkdir(exist_ok=True)
    port = port or free_port()
    log = workdir / "spillway.log"
    cmd = [str(SPILLWAY), "serve", "--config", str(config), "--port", str(port)]
    cmd += ["--data-dir", str(workdir / "data")]
    proc = subprocess.Popen(cmd, env=clean_env(), stdout=log.open("ab"), stderr=subprocess.STDOUT)
    return Replica(proc, f"http://127.0.0.1:{port}", log, config, workdir, port)


def restart(replica: Replica) -> Replica:
    """Stop it gracefully (SIGTERM) and start it again on the same port and data."""
    stop([replica])
    return start(replica.config, replica.workdir, replica.port)


async def wait_ready(replica: Replica, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=1) as client:
        while time.monotonic() < deadline:
            if replica.proc.poll() is not None:
                raise RuntimeError(replica.log.read_text())
            try:
                if (await client.get(replica.url + "/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{replica.url} not ready: {replica.log.read_text()}")


def stop(replicas: Iterable[Replica]) -> None:
    running = list(replicas)
    for replica in running:
        if replica.proc.poll() is None:
            replica.proc.terminate()
    for replica in running:
        try:
            replica.proc.wait(30)
        except subprocess.TimeoutExpired:
            replica.proc.kill()
            replica.proc.wait()


async def chat(
    client: httpx.AsyncClient,
    replica: Replica,
    key: str,
    model: str = "m",
    request_id: str | None = None,
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    if request_id is not None:
        headers["x-request-id"] = request_id
    return await client.post(
        replica.url + "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
        headers=headers,
    )
