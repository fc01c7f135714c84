"""`spillway serve --workers 2` with a managed node that dies by SIGILL on its first request
(the stand-in in tests/fakes/crashing_node.py): the parent supervises it, and every worker
must still see it as failed, say why, and recover when it serves again."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.e2e.conftest import SPILLWAY, clean_env, free_port, stop

STANDIN = Path(__file__).parent.parent / "fakes" / "crashing_node.py"


def write_config(workdir: Path, heal: Path) -> Path:
    command = [sys.executable, str(STANDIN), "--port", "{port}", "--heal-file", str(heal)]
    config = workdir / "spillway.toml"
    config.write_text(
        '[nodes.local]\nkind = "private"\nmodels = { m = "smollm2-135m-instruct" }\n'
        f"managed = {{ command = {json.dumps(command)} }}\n"
    )
    return config


def test_every_worker_sees_the_crashed_node_and_its_recovery(tmp_path: Path) -> None:
    heal, port, log = tmp_path / "heal", free_port(), tmp_path / "spillway.log"
    cmd = [str(SPILLWAY), "serve", "--port", str(port), "--workers", "2"]
    cmd += ["--config", str(write_config(tmp_path, heal)), "--data-dir", str(tmp_path / "data")]
    proc = subprocess.Popen(cmd, env=clean_env(), stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=10) as http:
            wait(lambda: _get(http, "/healthz") == 200, proc, log)
            # Several requests, so both workers (the kernel spreads connections) answer.
            for _ in range(6):
                with httpx.Client(base_url=url, timeout=10) as fresh:
                    ready = fresh.get("/readyz")
                    chat = fresh.post("/v1/chat/completions", json=ask())
                assert ready.status_code == 503
                assert ready.json()["nodes"]["local"]["state"] == "failed"
                assert "CPU instructions" in ready.json()["nodes"]["local"]["error"]
                assert chat.status_code == 503
                assert "local: process killed by SIGILL" in chat.json()["error"]["message"]
            text = log.read_text()
            assert "node local: process killed by SIGILL: illegal instruction" in text
            heal.touch()
            wait(lambda: http.get("/readyz").status_code == 200, proc, log, within_s=60)
            answer = http.post("/v1/chat/completions", json=ask())
            assert answer.status_code == 200 and answer.headers["x-spillway-node"] == "local"
    finally:
        stop(proc)


def ask() -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _get(http: httpx.Client, path: str) -> int | None:
    try:
        return http.get(path).status_code
    except httpx.HTTPError:
        return None


def wait(condition, proc, log: Path, within_s: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within_s
    while not condition():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
