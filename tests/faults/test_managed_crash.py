"""A managed node that dies on its first request (a llama.cpp build for another CPU: SIGILL).

The stand-in (tests/fakes/crashing_node.py) starts and answers GET /v1/models like a healthy
server, then kills itself with SIGILL on a chat request. spillway must say so in its log,
back off instead of restarting every second, keep the node out of rotation and /readyz,
and answer clients with a 503 that names the cause.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from click.testing import CliRunner

from spillway.cli.main import cli
from spillway.clock import SystemClock
from spillway.config.schema import ManagedNode
from spillway.nodes import managed
from spillway.nodes.managed import ManagedLlamaServer, NodeStartError
from tests.fakes.gateway import running_gateway
from tests.faults.test_signals_live import until

STANDIN = Path(__file__).parent.parent / "fakes" / "crashing_node.py"


class RecordingClock(SystemClock):
    """The real clock, but back-off sleeps are recorded and shortened to 50 ms."""

    def __init__(self) -> None:
        self.backoffs: list[float] = []

    async def sleep(self, seconds: float) -> None:
        if seconds >= 1:
            self.backoffs.append(seconds)
        await asyncio.sleep(min(seconds, 0.05))


def standin(heal_file: Path, mode: str = "sigill", **extra: Any) -> ManagedNode:
    command = (sys.executable, str(STANDIN), "--port", "{port}", "--heal-file", str(heal_file))
    return ManagedNode(command=(*command, "--mode", mode), **extra)


async def test_a_node_killed_by_sigill_is_failed_logged_and_backed_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(managed, "STABLE_S", 0.5)  # served this long, the series is over
    clock = RecordingClock()
    heal = tmp_path / "heal"
    server = ManagedLlamaServer("local", standin(heal), tmp_path, clock)
    caplog.set_level(logging.INFO, "spillway.nodes.managed")
    await server.start()  # the readiness probe's one-token chat kills it: not an exception
    try:
        status = server.status()
        assert status.state == "failed" and not status.serving
        assert status.summary == "process killed by SIGILL"
        assert status.reason is not None and "CPU instructions" in status.reason
        assert "install_llama_cpp.py" in status.reason  # says how to fix it
        await until(lambda: len(clock.backoffs) >= 4, 30)
        assert clock.backoffs[:4] == [1.0, 2.0, 4.0, 8.0]  # not once a second
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert errors[0].startswith("node local: process killed by SIGILL: illegal instruction")
        assert "restarting in 1 s (crash 1 in a row)" in errors[0]
        assert "restarting in 8 s (crash 4 in a row)" in errors[3]
        # It serves again: ready only after the one-token probe, and the reason is cleared.
        heal.touch()
        await until(lambda: server.status().serving, 30)
        assert server.status().reason is None and server.status().restarts >= 4
        assert any("ready on port" in r.getMessage() for r in caplog.records)
        assert server.status().crashes >= 4
        await until(lambda: server.status().crashes == 0, 5)  # reported, not only at a crash
    finally:
        await server.aclose()
    assert server.status().state == "stopped"


@pytest.mark.parametrize("mode", ["error", "hang"])
async def test_readiness_needs_a_generated_token_not_only_models(tmp_path: Path, mode: str) -> None:
    spec = standin(tmp_path / "never", mode=mode, start_timeout_s=1.5)
    server = ManagedLlamaServer("local", spec, tmp_path, SystemClock())
    started = time.monotonic()
    with pytest.raises(NodeStartError, match=r"did not generate a token within 1\.5 s") as caught:
        await server.start()  # GET /v1/models answers 200 all along
    took = time.monotonic() - started
    await server.aclose()
    assert took < 4.0  # start_timeout_s, not the 30 s a single probe may take
    assert str(tmp_path) in caught.value.message  # the operator is told where the log is
    assert server.status().reason is None or str(tmp_path) not in server.status().reason


async def test_clients_readyz_and_nodes_name_the_crash(tmp_path: Path) -> None:
    heal = tmp_path / "heal"
    command = list(standin(heal).command or ())
    raw = {
        "nodes": {
            "local": {"kind": "private", "models": {"m": "m"}, "managed": {"command": command}}
        }
    }
    async with running_gateway(raw) as gw:
        client = gw.client()
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}]
            )
        assert caught.value.status_code == 503
        message = caught.value.message
        assert "local: process killed by SIGILL" in message and "retry in about" in message
        assert int(caught.value.response.headers["retry-after"]) >= 1

        async with httpx.AsyncClient(base_url=gw.url) as http:
            ready = await http.get("/readyz")
            admin = (await http.get("/admin/nodes")).json()
        assert ready.status_code == 503
        local = ready.json()["nodes"]["local"]
        assert local["state"] == "failed"
        assert "CPU instructions" in local["error"]
        assert local["managed"]["process"] in ("failed", "restarting")
        managed = next(n for n in admin["nodes"] if n["name"] == "local")["managed"]
        assert managed["summary"] == "process killed by SIGILL"
        assert managed["crashes_in_a_row"] >= 1

        shown = await asyncio.to_thread(CliRunner().invoke, cli, ["nodes", "--url", gw.url])
        assert shown.exit_code == 0, shown.output
        assert "local: " in shown.output and "SIGILL" in shown.output

        heal.touch()  # the node serves again after its next (backed-off) restart
        await until(lambda: gw.gateway.router.handles[0].out_of_service() is None, 40)
        reply = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content == "Hello"


async def test_a_command_that_cannot_run_is_a_clear_start_up_error(tmp_path: Path) -> None:
    spec = ManagedNode(command=(str(tmp_path / "no-such-server"), "--port", "{port}"))
    server = ManagedLlamaServer("local", spec, tmp_path, SystemClock())
    with pytest.raises(NodeStartError, match=r"node 'local': cannot run '.*no-such-server': "):
        await server.start()
    await server.aclose()
