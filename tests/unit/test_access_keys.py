"""Managed keys in the ledger's database (``access/``), on both real engines: only an HMAC is
stored, every change moves the revision and lands in the audit trail with it, rotation keeps
the ledger name, and a process with another secret says so."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from spillway.access.audit import AuditTrail
from spillway.access.records import KeyRequest, parse_budget, parse_duration
from spillway.access.store import KeyStore, SecretMismatch
from spillway.access.tokens import KeyHasher, hasher_for, prefix_of
from spillway.clock import ManualClock
from spillway.config.keys import KeyPolicy
from spillway.config.load import validate
from spillway.errors import InvalidRequest, KeyNotFound, StartupError
from spillway.ledger.sql import SqlLedgerStore
from tests.pg import PgServer, create_database

SECRET = b"s" * 32
T0 = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    server: PgServer = request.getfixturevalue("pg_server")
    return await create_database(server, "keys")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(wall_start=T0.timestamp())


@pytest.fixture
async def db(url: str, clock: ManualClock) -> AsyncIterator[SqlLedgerStore]:
    database = SqlLedgerStore(url, clock)
    await database.open()
    yield database
    await database.aclose()


@pytest.fixture
def store(db: SqlLedgerStore, clock: ManualClock) -> KeyStore:
    return KeyStore(db, KeyHasher(SECRET), clock)


POLICY = KeyPolicy(rpm=60, models=("m",), budget=parse_budget("5/month"))


async def test_a_new_key_is_stored_only_as_its_hmac(store, url, tmp_path):
    issued = await store.create("team-a", POLICY, "cli:alice", name="notebook")
    key = issued.key
    assert key.startswith("sk-spw-") and len(key) == 7 + 43
    record = issued.record
    assert record.prefix == prefix_of(key) and len(record.prefix) == 15
    assert record.key_hash == KeyHasher(SECRET).hash(key)
    assert record.key_hash != hashlib.sha256(key.encode()).hexdigest()  # keyed, not plain
    listed = await store.keys()
    assert [k.prefix for k in listed] == [record.prefix]
    public = listed[0].public(T0)
    assert "key_hash" not in public and key not in repr(public)
    assert public["rpm"] == 60 and public["models"] == ["m"] and public["state"] == "active"
    if url.startswith("sqlite"):  # nothing in the file gives the key away
        raw = b"".join(p.read_bytes() for p in tmp_path.glob("ledger.db*"))
        assert key.encode() not in raw and key[15:].encode() not in raw


async def test_every_change_moves_the_revision_and_is_audited(store, db, clock):
    assert await store.revision() == 0
    first = await store.create("t", POLICY, "cli:alice")
    assert await store.revision() == 1
    await store.revoke(first.record.prefix, "key:abcd")
    assert await store.revision() == 2
    assert await store.usable() == []
    second = await store.create("t", KeyPolicy(), "cli:alice")
    clock.advance(1)
    await store.rotate(second.key, "cli:bob")  # named by the whole key
    assert await store.revision() == 4
    await store.touch({second.record.prefix: T0 + timedelta(hours=1)})
    assert await store.revision() == 4  # last-used never moves it
    events = await AuditTrail(db, clock).events()
    actions = [(e.action, e.actor) for e in events]
    assert sorted(actions) == sorted(
        [
            ("key.create", "cli:alice"),
            ("key.revoke", "key:abcd"),
            ("key.create", "cli:alice"),
            ("key.rotate", "cli:bob"),
        ]
    )
    created = next(
        e for e in events if e.target == first.record.prefix and e.action == "key.create"
    )
    assert created.detail["rpm"] == 60 and created.detail["budget"]["amount"] == "5"
    assert first.key not in repr(events) and first.record.key_hash not in repr(events)


async def test_rotation_keeps_the_ledger_name_and_the_grace_period(store, clock):
    old = await store.create("t", POLICY, "cli:alice", expires_at=T0 + timedelta(days=30))
    new, replaced = await store.rotate(old.record.prefix, "cli:alice", timedelta(hours=1))
    assert replaced.prefix == old.record.prefix
    assert new.record.key_id == old.record.key_id
    assert new.record.policy == POLICY and new.record.expires_at == old.record.expires_at
    assert new.key != old.key
    usable = {k.prefix for k in await store.usable()}
    assert usable == {old.record.prefix, new.record.prefix}  # the old one is in its grace
    clock.advance(3601)
    assert {k.prefix for k in await store.usable()} == {new.record.prefix}
    everything = {k.prefix: k for k in await store.keys(include_ended=True)}
    assert everything[old.record.prefix].replaced_by == new.record.prefix
    assert everything[old.record.prefix].state(datetime.fromtimestamp(clock.wall(), UTC)) == (
        "revoked"
    )
    with pytest.raises(KeyNotFound):  # a revoked key cannot be revoked or rotated again
        await store.revoke(old.record.prefix, "cli:alice")
    with pytest.raises(InvalidRequest, match="names 2 keys"):  # the key id is shared now
        await store.find(old.record.key_id)


async def test_expired_keys_are_not_usable(store, clock):
    await store.create("t", KeyPolicy(), "cli:a", expires_at=T0 + timedelta(seconds=10))
    assert len(await store.usable()) == 1
    clock.advance(10)
    assert await store.usable() == []
    assert len(await store.keys(include_ended=True)) == 1


async def test_unknown_names_are_refused_without_echoing_a_key(store):
    await store.create("t", KeyPolicy(), "cli:a")
    unknown = "sk-spw-notthere" + "0" * 35  # shaped like a whole key
    with pytest.raises(KeyNotFound) as caught:
        await store.revoke(unknown, "cli:a")
    assert "'sk-spw-notthere'" in caught.value.message  # its prefix only
    assert "0000" not in caught.value.message
    with pytest.raises(InvalidRequest, match="Give a key's prefix"):
        await store.revoke("sk-spw-notthere00", "cli:a")  # neither prefix nor key
    with pytest.raises(KeyNotFound) as configured:
        await store.revoke("sk-live-configured-in-toml", "cli:a")
    assert "sk-live" not in configured.value.message and "[[keys]]" in configured.value.message
    with pytest.raises(InvalidRequest, match="tenant"):
        await store.create("no spaces allowed", KeyPolicy(), "cli:a")


async def test_a_rotated_key_cannot_be_rotated_again_and_revoking_ends_its_grace(store):
    old = await store.create("t", KeyPolicy(), "cli:a")
    new, _ = await store.rotate(old.record.prefix, "cli:a", timedelta(minutes=1))
    with pytest.raises(InvalidRequest, match="rotated already"):
        await store.rotate(old.record.prefix, "cli:a", timedelta(weeks=52))
    assert {k.prefix for k in await store.usable()} == {old.record.prefix, new.record.prefix}
    await store.revoke(old.record.prefix, "cli:a")  # ends the grace period at once
    assert {k.prefix for k in await store.usable()} == {new.record.prefix}


async def test_concurrent_changes_to_one_key_do_not_both_land(store, db, clock):
    first = await store.create("t", KeyPolicy(), "cli:a")
    outcomes = await asyncio.gather(
        store.rotate(first.record.prefix, "cli:a"),
        store.rotate(first.record.prefix, "cli:b"),
        store.revoke(first.record.prefix, "cli:c"),
        return_exceptions=True,
    )
    landed = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(landed) == 1, outcomes
    assert all(isinstance(o, (KeyNotFound, InvalidRequest)) for o in outcomes if o not in landed)
    usable = await store.usable()
    assert len(usable) <= 1  # a successor, or none when the revoke won
    assert first.record.prefix not in {k.prefix for k in usable}


async def test_the_first_keys_issued_at_once_agree_on_the_secret(url, clock):
    stores = [SqlLedgerStore(url, clock) for _ in range(4)]
    try:
        for database in stores:
            await database.open()
        made = await asyncio.gather(
            *(KeyStore(d, KeyHasher(SECRET), clock).create("t", KeyPolicy(), "a") for d in stores)
        )
        assert len({m.record.prefix for m in made}) == 4
    finally:
        for database in stores:
            await database.aclose()


async def test_a_process_with_another_secret_says_so(store, db, clock):
    await store.create("t", KeyPolicy(), "cli:a")
    other = KeyStore(db, KeyHasher(b"x" * 32), clock)
    with pytest.raises(SecretMismatch, match="same \\[server\\] secret"):
        await other.check_secret(claim=False)
    with pytest.raises(SecretMismatch):
        await other.create("t", KeyPolicy(), "cli:a")
    await store.check_secret(claim=False)  # the right one passes


async def test_last_used_only_moves_forward(store):
    issued = await store.create("t", KeyPolicy(), "cli:a")
    prefix = issued.record.prefix
    later, earlier = T0 + timedelta(hours=2), T0 + timedelta(hours=1)
    await store.touch({prefix: later})
    await store.touch({prefix: earlier})
    assert (await store.find(prefix)).last_used_at == later


def test_durations_and_budgets_as_people_write_them():
    assert parse_duration("30d") == timedelta(days=30)
    assert parse_duration(" 12h ") == timedelta(hours=12)
    assert parse_duration("2w") == timedelta(weeks=2)
    for bad in ("0d", "30", "d", "1.5h", "-1h", "30 days", "9999999999d"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)
    with pytest.raises(ValueError, match="100 years"):
        parse_duration("99999999w")
    budget = parse_budget("300CNY/day")
    assert (budget.amount, budget.currency, budget.period) == (Decimal(300), "CNY", "day")
    assert parse_budget("12.5 usd / Month").currency == "USD"
    for bad in ("50", "50/year", "0/day", "-5/day", "5EUR/day"):
        with pytest.raises(ValueError, match="not a budget"):
            parse_budget(bad)


def test_a_key_request_takes_the_policy_fields_and_refuses_others():
    wanted = KeyRequest.model_validate(
        {"tenant": "t", "budget": "5/month", "rpm": 3, "expires_in": "1h", "pii": "block"}
    )
    assert wanted.policy.rpm == 3 and wanted.policy.pii == "block"
    assert wanted.expires_at(T0) == T0 + timedelta(hours=1)
    for bad in ({"tenant": "t", "key": "sk-mine-0000"}, {"tenant": "t", "rpm": 0}, {}):
        with pytest.raises(ValueError):
            KeyRequest.model_validate(bad)


def test_the_secret_file_is_private_and_stable(tmp_path):
    config = validate(
        {"server": {"data_dir": str(tmp_path)}, "nodes": {"n": {"kind": "cloud",
         "base_url": "http://127.0.0.1:9/v1", "models": {"m": "m"}}}}
    )  # fmt: skip
    first = hasher_for(config).hash("k")
    mode = stat.S_IMODE(os.stat(tmp_path / "secret").st_mode)
    assert mode == 0o600
    assert hasher_for(config).hash("k") == first


def test_a_shared_database_needs_a_configured_secret(tmp_path):
    base = {
        "server": {"data_dir": str(tmp_path)},
        "ledger": {"url": "postgresql+asyncpg://u@127.0.0.1:1/db"},
        "nodes": {
            "n": {"kind": "cloud", "base_url": "http://127.0.0.1:9/v1", "models": {"m": "m"}}
        },
    }
    with pytest.raises(StartupError, match="server\\] secret"):
        hasher_for(validate(base))
    configured = validate({**base, "server": {**base["server"], "secret": "z" * 32}})
    assert hasher_for(configured).hash("k") == KeyHasher(b"z" * 32).hash("k")
    assert not (tmp_path / "secret").exists()
