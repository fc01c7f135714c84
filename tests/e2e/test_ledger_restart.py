"""Reconciliation: a load run with a graceful restart in the middle; every request the
gateway answered has its ledger row, to the row, and `spillway report` reads them."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.conftest import SPILLWAY, Gateway, clean_env, start_gateway, stop

pytestmark = pytest.mark.e2e
BODY = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def load(gateway: Gateway, requests: int, stop_after: int | None = None) -> int:
    """Send ``requests`` requests from 3 workers; SIGTERM the gateway once ``stop_after``
    answers arrived. Returns how many requests got an HTTP answer (of any status)."""
    answered = 0
    todo = iter(range(requests))

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal answered
        for _ in todo:
            try:
                async with session.post(gateway.base_url + "/chat/completions", json=BODY) as r:
                    await r.read()
                    answered += 1
            except (aiohttp.ClientError, OSError):
                continue  # the gateway was stopping: never served, so no ledger row either
            if stop_after is not None and answered == stop_after:
                gateway.proc.send_signal(signal.SIGTERM)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(3)))
    return answered


def test_graceful_restart_keeps_every_record(llama_node: str, tmp_path: Path):
    (tmp_path / "spillway.toml").write_text(
        f'[nodes.gpu]\nkind = "private"\nbase_url = "{llama_node}"\nmodels = {{chat = "smollm2"}}\n'
        "[ledger]\nflush_interval_s = 5\n"  # longer than the run: only shutdown flushes
    )
    first = start_gateway(tmp_path)
    answered = asyncio.run(load(first, 40, stop_after=15))
    assert first.proc.wait(timeout=30) == 0
    second = start_gateway(tmp_path)
    answered += asyncio.run(load(second, 15))
    assert stop(second.proc) == 0

    report = subprocess.run(
        [str(SPILLWAY), "report", "--format", "json", "--by", "source",
         "--data-dir", str(tmp_path / "data")],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    total = json.loads(report.stdout)[-1]
    assert total["group"] == "total"
    assert total["requests"] == answered
    assert answered >= 30
