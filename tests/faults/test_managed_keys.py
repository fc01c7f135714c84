"""Managed keys on a running gateway, through the real openai SDK (docs/security.md#managed-
keys): made and revoked over ``/admin/keys`` and with the ``spillway keys`` CLI, in effect
within 2 s on every replica (two gateways sharing one PostgreSQL), each enforcing its policy,
and every change and personal-data decision in the audit trail."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from spillway.ledger.sql import SqlLedgerStore
from spillway.server.auth import key_id
from tests.cache_helpers import needs_postgres
from tests.fakes.gateway import RunningGateway, node, running_gateway
from tests.fakes.upstream import FakeUpstream
from tests.pg import PgServer, create_database, postgres

ADMIN = "admin-key-000000"
USER = "user-key-0000000"
SECRET = "0123456789abcdef" * 4
HI: Any = [{"role": "user", "content": "hi"}]
#: 1 USD per million output tokens: a request with max_tokens = 8 may cost 0.000008
PRICE = {"input_per_mtok": 0, "output_per_mtok": 1}
SPILLWAY = str(Path(sys.executable).with_name("spillway"))


@pytest.fixture
async def up() -> AsyncIterator[FakeUpstream]:
    fake = await FakeUpstream("a").start()
    yield fake
    await fake.stop()


def config(up: FakeUpstream, data_dir: Path, **extra: Any) -> dict[str, Any]:
    nodes = {
        "a": {**node("private", up.base_url), "models": {"m": "m1", "n": "n1"}, "price": PRICE}
    }
    raw: dict[str, Any] = {
        "server": {"data_dir": str(data_dir)},
        "nodes": nodes,
        "keys": [
            {"key": ADMIN, "tenant": "ops", "admin": True},
            {"key": USER, "tenant": "t"},
        ],
        "cache": {"mode": "off"},
        "ledger": {"flush_interval_s": 0.05},
    }
    raw.update(extra)
    return raw


@pytest.fixture
async def gw(up: FakeUpstream, tmp_path: Path) -> AsyncIterator[RunningGateway]:
    async with running_gateway(config(up, tmp_path)) as running:
        yield running


async def admin(
    gw: RunningGateway, method: str, path: str, body: Any = None, key: str = ADMIN
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=gw.url) as http:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return await http.request(method, path, json=body, headers=headers)


async def works(gw: RunningGateway, key: str, model: str = "m") -> bool:
    try:
        await gw.client(key).chat.completions.create(model=model, messages=HI)
    except openai.AuthenticationError:
        return False
    return True


async def until(check: Callable[[], Awaitable[bool]], limit_s: float = 5.0) -> float:
    """Seconds until ``check`` holds (polled every 50 ms); fails after ``limit_s``."""
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < limit_s, "not within the limit"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def test_a_key_made_over_the_admin_api_works_at_once_and_stops_when_revoked(gw, tmp_path):
    made = await admin(gw, "POST", "/admin/keys", {"tenant": "team-b", "name": "nb", "rpm": 100})
    assert made.status_code == 201, made.text
    body = made.json()
    key, prefix = body["key"], body["prefix"]
    assert key.startswith(prefix) and body["tenant"] == "team-b" and body["rpm"] == 100
    assert await works(gw, key)  # no wait: this replica took the change before answering
    listed = (await admin(gw, "GET", "/admin/keys")).json()["data"]
    assert [k["prefix"] for k in listed] == [prefix]
    assert key not in orjson.dumps(listed).decode() and "key_hash" not in listed[0]
    revoked = await admin(gw, "POST", f"/admin/keys/{prefix}/revoke")
    assert revoked.status_code == 200 and revoked.json()["state"] == "revoked"
    assert not await works(gw, key)
    assert (await admin(gw, "GET", "/admin/keys")).json()["data"] == []
    assert len((await admin(gw, "GET", "/admin/keys?all=true")).json()["data"]) == 1
    events = (await admin(gw, "GET", "/admin/audit?kind=admin")).json()["data"]
    assert [e["action"] for e in events] == ["key.revoke", "key.create"]
    assert {e["actor"] for e in events} == {f"key:{key_id(ADMIN)}"}


async def test_each_managed_key_keeps_to_its_policy(gw, up):
    async def make(**policy: Any) -> str:
        made = await admin(gw, "POST", "/admin/keys", {"tenant": "t", **policy})
        assert made.status_code == 201, made.text
        return str(made.json()["key"])

    narrow = await make(models=["m"])
    assert [m.id async for m in gw.client(narrow).models.list()] == ["m"]
    with pytest.raises(openai.NotFoundError) as hidden:
        await gw.client(narrow).chat.completions.create(model="n", messages=HI)
    assert hidden.value.code == "model_not_found"

    slow = await make(rpm=2)
    assert await works(gw, slow) and await works(gw, slow)
    with pytest.raises(openai.RateLimitError):
        await gw.client(slow).chat.completions.create(model="m", messages=HI)

    poor = await make(budget="0.00001/day")  # one request of max_tokens 8 fits, two do not
    create = gw.client(poor).chat.completions.create
    assert (await create(model="m", messages=HI, max_tokens=8)).choices
    with pytest.raises(openai.RateLimitError) as spent:
        await create(model="m", messages=HI, max_tokens=8)
    assert spent.value.code == "insufficient_quota"

    not_admin = await make()
    refused = await admin(gw, "GET", "/admin/keys", key=not_admin)
    assert refused.status_code == 403

    brief = await make(expires_in="1s")
    assert await works(gw, brief)
    await asyncio.sleep(1.05)
    with pytest.raises(openai.AuthenticationError) as expired:
        await gw.client(brief).chat.completions.create(model="m", messages=HI)
    assert expired.value.code == "expired_api_key"


async def test_rotation_hands_over_with_or_without_grace(gw):
    first = (await admin(gw, "POST", "/admin/keys", {"tenant": "t"})).json()
    rotated = await admin(gw, "POST", f"/admin/keys/{first['prefix']}/rotate", {"grace": "1h"})
    assert rotated.status_code == 201, rotated.text
    second = rotated.json()
    assert second["replaces"] == first["prefix"] and second["key_id"] == first["key_id"]
    assert await works(gw, first["key"]) and await works(gw, second["key"])
    third = (await admin(gw, "POST", f"/admin/keys/{second['prefix']}/rotate")).json()
    assert not await works(gw, second["key"])  # no grace: refused at once
    assert await works(gw, third["key"]) and await works(gw, first["key"])


async def test_bad_admin_requests_say_what_to_fix(gw):
    whole = (await admin(gw, "POST", "/admin/keys", {"tenant": "t"})).json()["key"]
    in_url = await admin(gw, "POST", f"/admin/keys/{whole}/revoke")
    assert in_url.status_code == 400 and "prefix" in in_url.json()["error"]["message"]
    assert whole not in in_url.text
    cases = [
        ({"tenant": "t", "models": ["nope"]}, "no node serves nope"),
        ({"tenant": "t", "budget": "5/year"}, "not a budget"),
        ({"tenant": "t", "key": "sk-mine-000000"}, "key: Extra inputs are not permitted"),
        ({"tenant": "bad tenant"}, "tenant"),
        ({"tenant": "t", "expires_in": "forever"}, "not a duration"),
    ]
    for body, words in cases:
        answer = await admin(gw, "POST", "/admin/keys", body)
        assert answer.status_code == 400, body
        assert words in answer.json()["error"]["message"], answer.text
    missing = await admin(gw, "POST", "/admin/keys/sk-spw-nothere0/revoke")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "key_not_found"
    assert (await admin(gw, "GET", "/admin/keys", key="")).status_code == 401
    assert (await admin(gw, "GET", "/admin/keys", key=USER)).status_code == 403


async def test_an_open_gateway_is_closed_by_its_first_key(up, tmp_path):
    raw = config(up, tmp_path)
    raw.pop("keys")
    async with running_gateway(raw) as gw:
        assert await works(gw, "anything")  # open: no key needed
        made = await admin(gw, "POST", "/admin/keys", {"tenant": "ops", "admin": True}, key="")
        assert made.status_code == 201, made.text  # from this machine, without a key
        key = made.json()["key"]
        assert not await works(gw, "anything")
        assert await works(gw, key)
        assert (await admin(gw, "GET", "/admin/keys", key=key)).status_code == 200


async def test_personal_data_decisions_are_audited_without_values(up, tmp_path):
    phone = "13812345678"
    raw = config(up, tmp_path, pii={"action": "block"})
    raw["keys"].append({"key": "mask-key-000000", "tenant": "m", "pii": "mask"})
    async with running_gateway(raw) as gw:
        with pytest.raises(openai.BadRequestError):
            await gw.client(USER).chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"call {phone}"}]
            )
        await gw.client("mask-key-000000").chat.completions.create(
            model="m", messages=[{"role": "user", "content": f"{phone} a@b.cn"}]
        )
        await gw.client(USER).chat.completions.create(model="m", messages=HI)

        async def logged() -> bool:
            answer = await admin(gw, "GET", "/admin/audit?kind=pii")
            return len(answer.json()["data"]) == 2

        await until(logged)
        answer = await admin(gw, "GET", "/admin/audit?kind=pii")
    events = {e["action"]: e for e in answer.json()["data"]}
    assert set(events) == {"pii.block", "pii.mask"}
    assert events["pii.block"]["detail"]["kinds"] == {"mobile": 1}
    assert events["pii.block"]["detail"]["status"] == "error"
    assert events["pii.mask"]["detail"]["kinds"] == {"email": 1, "mobile": 1}
    assert events["pii.mask"]["tenant"] == "m"
    assert phone not in answer.text and "a@b.cn" not in answer.text


async def test_last_used_is_written_and_the_key_is_nowhere(up, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    async with running_gateway(config(up, tmp_path)) as gw:
        made = (await admin(gw, "POST", "/admin/keys", {"tenant": "t"})).json()
        key = made["key"]
        assert await works(gw, key)
        gw.client(key)  # closed with the gateway
    database = SqlLedgerStore(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}")
    try:
        records = await database.query()
    finally:
        await database.aclose()
    mine = [r for r in records if r.key_id == made["key_id"]]
    assert len(mine) == 1 and mine[0].tenant == "t"
    async with running_gateway(config(up, tmp_path)) as gw:
        listed = (await admin(gw, "GET", "/admin/keys")).json()["data"]
    assert listed[0]["last_used_at"] is not None
    files = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert key.encode() not in files and key[15:].encode() not in files
    assert key not in caplog.text and key[15:] not in caplog.text


# --- two replicas sharing one PostgreSQL ------------------------------------------------


@pytest.fixture(scope="module")
def pg() -> Any:
    needs_postgres()
    with postgres() as server:
        yield server


async def cli(config_path: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        SPILLWAY, *args, "--config", str(config_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_changes_reach_every_replica_within_two_seconds(pg: PgServer, up, tmp_path):
    url = await create_database(pg, "replicas")
    shared = {"ledger": {"url": url, "flush_interval_s": 0.05}}
    raws = [config(up, tmp_path / f"r{i}", **shared) for i in range(2)]
    for raw in raws:
        raw["server"]["secret"] = SECRET
    toml = tmp_path / "spillway.toml"
    toml.write_text(
        f'[server]\ndata_dir = "{tmp_path / "cli"}"\nsecret = "{SECRET}"\n'
        f'[ledger]\nurl = "{url}"\n'
        f'[nodes.a]\nkind = "private"\nbase_url = "{up.base_url}"\n'
        'models = { m = "m1", n = "n1" }\n'
    )
    async with running_gateway(raws[0]) as a, running_gateway(raws[1]) as b:
        made = (await admin(a, "POST", "/admin/keys", {"tenant": "t"})).json()
        key = made["key"]
        seen_by_b = await until(lambda: works(b, key))
        rc, out, err = await cli(toml, "keys", "revoke", made["prefix"])
        assert rc == 0, err
        gone_from_a = await until(lambda: _refused(a, key))
        gone_from_b = await until(lambda: _refused(b, key))
        rc, out, err = await cli(toml, "keys", "create", "--tenant", "u", "--format", "json")
        assert rc == 0, err
        from_cli = orjson.loads(out)["key"]
        in_a = await until(lambda: works(a, from_cli))
        in_b = await until(lambda: works(b, from_cli))
    print(
        f"replica timings: create on A seen by B {seen_by_b:.2f} s; CLI revoke refused by "
        f"A {gone_from_a:.2f} s, B {gone_from_b:.2f} s; CLI create accepted by A "
        f"{in_a:.2f} s, B {in_b:.2f} s"
    )
    assert max(seen_by_b, gone_from_a, gone_from_b, in_a, in_b) < 2.0


async def _refused(gw: RunningGateway, key: str) -> bool:
    return not await works(gw, key)


async def test_a_replica_with_another_secret_refuses_to_start(pg: PgServer, up, tmp_path):
    url = await create_database(pg, "secrets")
    first = config(up, tmp_path / "a", ledger={"url": url})
    first["server"]["secret"] = SECRET
    async with running_gateway(first) as gw:
        assert (await admin(gw, "POST", "/admin/keys", {"tenant": "t"})).status_code == 201
    other = config(up, tmp_path / "b", ledger={"url": url})
    other["server"]["secret"] = "f" * 32
    with pytest.raises(Exception, match="another secret"):
        async with running_gateway(other):
            pass


async def test_revoking_the_last_key_does_not_open_the_gateway_again(up, tmp_path):
    raw = config(up, tmp_path)
    raw.pop("keys")
    async with running_gateway(raw) as gw:
        made = await admin(gw, "POST", "/admin/keys", {"tenant": "ops", "admin": True}, key="")
        key, prefix = made.json()["key"], made.json()["prefix"]
        assert (await admin(gw, "POST", f"/admin/keys/{prefix}/revoke", key=key)).status_code == 200
        assert not await works(gw, "anything")
        with pytest.raises(openai.AuthenticationError) as revoked:
            await gw.client(key).chat.completions.create(model="m", messages=HI)
        assert "was revoked" in revoked.value.message
        again = await admin(gw, "POST", "/admin/keys", {"tenant": "x", "admin": True}, key="")
        assert again.status_code == 401
    async with running_gateway(raw) as gw:  # and after a restart
        assert not await works(gw, "anything")
    (tmp_path / "ledger.db").unlink()  # even when the database cannot tell: the data dir can
    for extra in tmp_path.glob("ledger.db-*"):
        extra.unlink()
    async with running_gateway(raw) as gw:
        assert not await works(gw, "anything")


async def test_a_browser_page_cannot_post_a_key_request_without_asking(gw):
    async with httpx.AsyncClient(base_url=gw.url) as http:
        simple = await http.post(
            "/admin/keys",
            content=b'{"tenant": "t"}',
            headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "text/plain"},
        )
        assert simple.status_code == 400 and "application/json" in simple.text
        made = await http.post(
            "/admin/keys", json={"tenant": "t"}, headers={"Authorization": f"Bearer {ADMIN}"}
        )
    assert made.status_code == 201 and made.headers["Cache-Control"] == "no-store"
    for body, words in (({"tenant": "t", "rpm": True}, "rpm"),
                        ({"tenant": "t", "private_only": "yes"}, "private_only"),
                        ({"tenant": "t", "models": []}, "at least one model"),
                        ({"tenant": "t", "expires_in": "99999999w"}, "100 years"),
                        ({"tenant": "t", "name": "a\x1b[31m"}, "control")):  # fmt: skip
        answer = await admin(gw, "POST", "/admin/keys", body)
        assert answer.status_code == 400 and words in answer.text, answer.text
    overflow = await admin(gw, "GET", "/admin/audit?since=9999999w")
    assert overflow.status_code == 400
