"""Process lifecycle: start, supervise, restart and stop the managed node; no orphans."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import SPILLWAY, Gateway, clean_env, start_gateway, stop

pytestmark = pytest.mark.e2e


def node_pid(gateway: Gateway) -> int:
    return int(httpx.get(gateway.url + "/readyz").json()["nodes"]["local"]["managed"]["pid"])


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_until(condition, within_s: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within_s} s")
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_graceful_stop_leaves_no_orphan(tmp_path: Path, sig: int):
    gateway = start_gateway(tmp_path)
    try:
        pid = node_pid(gateway)
        assert alive(pid)
    finally:
        code = stop(gateway.proc, sig)
    assert code == 0
    wait_until(lambda: not alive(pid), within_s=5)


def test_killed_gateway_takes_its_node_down_too(tmp_path: Path):
    gateway = start_gateway(tmp_path)
    pid = node_pid(gateway)
    gateway.proc.kill()
    gateway.proc.wait()
    wait_until(lambda: not alive(pid), within_s=5)


def test_dead_node_is_restarted_and_serves_again(tmp_path: Path):
    gateway = start_gateway(tmp_path)
    try:
        first = node_pid(gateway)
        subprocess.run(["kill", "-9", str(first)], check=True)

        def restarted() -> bool:
            body = httpx.get(gateway.url + "/readyz").json()
            managed = body["nodes"]["local"]["managed"]
            return bool(managed["restarts"] == 1 and managed["process"] == "running")

        wait_until(restarted, within_s=30)
        assert node_pid(gateway) != first
        answer = gateway.client().chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert answer.choices[0].message.content is not None
    finally:
        stop(gateway.proc)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SPILLWAY), *args], cwd=cwd, env=clean_env(), capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


def test_bad_config_exits_2_naming_the_setting(tmp_path: Path):
    config = tmp_path / "spillway.toml"
    config.write_text(
        '[nodes.ascend-1]\nkind = "private"\nbase_url = "10.0.0.11:8000"\nmodels = {glm = "glm"}\n'
    )
    result = run_cli("serve", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert "nodes.ascend-1.base_url: not a URL" in result.stderr


def test_config_check_masks_secrets(tmp_path: Path):
    config = tmp_path / "spillway.toml"
    config.write_text(
        '[nodes.cloud]\nkind = "cloud"\nbase_url = "https://api.deepseek.com/v1"\n'
        'api_key = "sk-very-secret-value-123"\nmodels = {chat = "deepseek-chat"}\n'
        '[[keys]]\nkey = "client-secret-key"\ntenant = "team-a"\nprivate_only = true\n'
    )
    result = run_cli("config", "check", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "sk-very-secret-value-123" not in result.stdout + result.stderr
    assert "client-secret-key" not in result.stdout + result.stderr
    assert '"base_url": "https://api.deepseek.com/v1"' in result.stdout
    assert "configuration OK" in result.stderr


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().split(")")[-1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_workers_share_the_port_and_stop_cleanly(tmp_path: Path):
    gateway = start_gateway(tmp_path, "--workers", "2")
    try:
        children = children_of(gateway.proc.pid)
        commands = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children]
        assert sum(b"llama_cpp.server" in c for c in commands) == 1, "one managed node, shared"
        assert sum(b"spawn_main" in c for c in commands) == 2, "two workers"
        for _ in range(4):
            answer = gateway.client().chat.completions.create(
                model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
            assert answer.choices
    finally:
        code = stop(gateway.proc)
    assert code == 0
    wait_until(lambda: not any(alive(pid) for pid in children), within_s=10)
