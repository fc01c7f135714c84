"""``spillway batch submit | status | results | cancel`` against a running gateway: bare
bodies are wrapped into batch lines, the results come back whole, mistakes are one line."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from tests.fakes.gateway import RunningGateway, node, running_gateway
from tests.fakes.upstream import FakeUpstream, Script

SPILLWAY = str(Path(sys.executable).with_name("spillway"))
KEY = "cli-batch-key-0001"


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[tuple[RunningGateway, FakeUpstream]]:
    up = await FakeUpstream("a", script=Script(echo=True)).start()
    config = {
        "server": {"data_dir": str(tmp_path / "data")},
        "nodes": {"a": {**node("private", up.base_url), "models": {"m": "m1"}}},
        "keys": [{"key": KEY, "tenant": "t"}],
        "cache": {"mode": "off"},
        "batch": {"poll_s": 0.2, "checkpoint_s": 0.2},
    }
    async with running_gateway(config) as running:
        yield running, up
    await up.stop()


async def cli(gw: RunningGateway, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "SPILLWAY_API_KEY": KEY}
    proc = await asyncio.create_subprocess_exec(
        SPILLWAY, "batch", *args, "--url", gw.url, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_submit_follow_and_fetch(gw, tmp_path):
    running, _ = gw
    source = tmp_path / "bodies.jsonl"
    bodies = [{"messages": [{"role": "user", "content": f"say {i}"}]} for i in range(25)]
    source.write_bytes(b"\n".join(orjson.dumps(b) for b in bodies) + b"\n\n")
    rc, out, err = await cli(running, "submit", str(source), "--model", "m")
    assert rc == 0, err
    batch_id = out.strip()
    assert batch_id.startswith("batch_") and "25 lines" in err
    for _ in range(100):
        rc, out, err = await cli(running, "status", batch_id, "--once")
        if "completed" in out:
            break
        await asyncio.sleep(0.2)
    assert "completed" in out and "25 (25 ok, 0 failed)" in out, out
    rc, out, _ = await cli(running, "status")
    assert batch_id in out
    target = tmp_path / "out.jsonl"
    rc, out, err = await cli(running, "results", batch_id, "-o", str(target))
    assert rc == 0, err
    rows = [orjson.loads(line) for line in target.read_bytes().splitlines()]
    answers = {r["custom_id"]: r["response"]["body"]["choices"][0]["message"]["content"]
               for r in rows}  # fmt: skip
    assert answers == {f"line-{i + 1}": f"echo: say {i}" for i in range(25)}
    assert not target.with_suffix(".errors.jsonl").exists()


async def test_mistakes_are_one_line(gw, tmp_path):
    running, _ = gw
    source = tmp_path / "bodies.jsonl"
    source.write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    rc, _, err = await cli(running, "submit", str(source))
    assert rc == 1 and "give --model" in err
    source.write_text("not json\n")
    rc, _, err = await cli(running, "submit", str(source), "--model", "m")
    assert rc == 1 and "bodies.jsonl:1: not valid JSON" in err
    rc, _, err = await cli(running, "status", "batch_nothere", "--once")
    assert rc == 1 and "404: No such Batch object" in err and "Traceback" not in err
    rc, _, err = await cli(running, "cancel", "batch_nothere")
    assert rc == 1 and "404" in err
