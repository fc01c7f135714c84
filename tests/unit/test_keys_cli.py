"""``spillway keys`` and ``spillway audit`` on the embedded database (SQLite), through click's
test runner: a key is printed once and listed never, every change is audited with the user
who made it, and mistakes exit non-zero with what to fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner, Result

from spillway.cli.main import cli
from tests.unit.test_cache_cli import write_config


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path)  # one cloud node serving "m"; data under tmp_path/data


def run(config: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, [*args, "--config", str(config)])


def as_json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return orjson.loads(result.stdout)


def test_create_list_rotate_revoke(config: Path, tmp_path: Path) -> None:
    made = as_json(
        run(config, "keys", "create", "--tenant", "team-a", "--budget", "50/month", "--rpm", "60",
            "--models", "m", "--private-only", "--expires", "30d", "--name", "ci",
            "--format", "json")
    )  # fmt: skip
    key, prefix = made["key"], made["prefix"]
    assert key.startswith(prefix) and made["private_only"] is True
    assert made["budget"] == {"amount": "50", "currency": "USD", "period": "month"}
    assert made["models"] == ["m"] and made["expires_at"] is not None

    plain = run(config, "keys", "create", "--tenant", "team-b")
    assert plain.exit_code == 0
    assert plain.stdout.strip().startswith("sk-spw-")  # the key alone on stdout, for scripts
    assert "shown once" in plain.stderr

    listed = as_json(run(config, "keys", "list", "--format", "json"))
    assert sorted(k["tenant"] for k in listed) == ["team-a", "team-b"]
    table = run(config, "keys", "list")
    assert prefix in table.stdout and "private-only" in table.stdout and key not in table.stdout
    assert key not in orjson.dumps(listed).decode()

    rotated = as_json(run(config, "keys", "rotate", key, "--grace", "1h", "--format", "json"))
    assert rotated["replaces"] == prefix and rotated["key_id"] == made["key_id"]
    revoked = run(config, "keys", "revoke", rotated["prefix"])
    assert revoked.exit_code == 0 and "revoked" in revoked.stdout
    left = {k["prefix"]: k["state"] for k in as_json(run(config, "keys", "list", "--all",
                                                             "--format", "json"))}  # fmt: skip
    assert left[rotated["prefix"]] == "revoked"

    events = as_json(run(config, "audit", "--format", "json"))
    actions = [e["action"] for e in events]
    assert actions.count("key.create") == 2 and "key.rotate" in actions
    assert actions[0] == "key.revoke"  # newest first
    assert all(e["actor"].startswith("cli") for e in events)
    assert key not in orjson.dumps(events).decode()
    files = b"".join(p.read_bytes() for p in (tmp_path / "data").rglob("*") if p.is_file())
    assert key.encode() not in files


def test_cache_clear_is_audited(config: Path) -> None:
    assert run(config, "cache", "clear", "--tenant", "team-a").exit_code == 0
    events = as_json(run(config, "audit", "--kind", "admin", "--format", "json"))
    assert [(e["action"], e["tenant"]) for e in events] == [("cache.clear", "team-a")]
    assert events[0]["detail"]["answers"] == 0


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("keys", "create", "--tenant", "t", "--models", "zzz"), "no node serves zzz"),
        (("keys", "create", "--tenant", "t", "--budget", "lots"), "not a budget"),
        (("keys", "create", "--tenant", "t", "--expires", "soon"), "not a duration"),
        (("keys", "create", "--tenant", "a b"), "tenant"),
        (("keys", "create", "--tenant", "t", "--rpm", "0"), "rpm"),
        (("keys", "revoke", "sk-spw-missing0"), "No usable managed key"),
        (("keys", "rotate", "sk-spw-missing0", "--grace", "x"), "--grace"),
        (("audit", "--since", "yesterday"), "--since"),
    ],
)
def test_mistakes_exit_1_saying_what_to_fix(config: Path, args: tuple[str, ...], words: str):
    result = run(config, *args)
    assert result.exit_code == 1, result.output
    assert words in result.stderr


def test_without_a_database_there_are_no_managed_keys(config: Path) -> None:
    config.write_text(config.read_text() + "\n[ledger]\nenabled = false\n")
    result = run(config, "keys", "list")
    assert result.exit_code == 2 and "enabled = false" in result.stderr


def test_names_are_shown_as_written_and_keys_can_come_from_stdin(config: Path) -> None:
    made = as_json(run(config, "keys", "create", "--tenant", "t", "--name", "[/x] [red]",
                       "--format", "json"))  # fmt: skip
    listed = run(config, "keys", "list")
    assert listed.exit_code == 0 and "[/x] [red]" in listed.stdout
    assert run(config, "audit").exit_code == 0
    revoked = CliRunner().invoke(
        cli, ["keys", "revoke", "-", "--config", str(config)], input=made["key"] + "\n"
    )
    assert revoked.exit_code == 0, revoked.output
    assert made["prefix"] in revoked.stdout and made["key"] not in revoked.stdout


def test_a_database_that_does_not_answer_is_one_line(config: Path) -> None:
    text = config.read_text().replace("[server]\n", f'[server]\nsecret = "{"s" * 32}"\n', 1)
    config.write_text(text + '\n[ledger]\nurl = "postgresql+asyncpg://u:pw@127.0.0.1:9/db"\n')
    result = run(config, "keys", "list")
    assert result.exit_code == 1
    assert "did not answer" in result.stderr and "Traceback" not in result.output
    assert "pw@" not in result.stderr
