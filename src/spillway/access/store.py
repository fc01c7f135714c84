"""Managed keys in the ledger's database: issue, list, revoke, rotate; each change audited.

Every change bumps ``key_revision`` in its own transaction, with its audit row: a running
gateway polls that one integer (``KeyStore.revision``) and reloads the keys when it moves,
so a change reaches every replica within one poll. A revoked key keeps its row (``keys
list --all`` shows it, and the ledger still names its ``key_id``).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from spillway.access.audit import record_action
from spillway.access.records import IssuedKey, ManagedKey
from spillway.access.tokens import (
    KEY_SCHEME,
    PREFIX_LENGTH,
    KeyHasher,
    is_prefix,
    looks_managed,
    new_key,
    new_key_id,
    prefix_of,
)
from spillway.clock import Clock
from spillway.config.keys import KeyPolicy, check_tenant
from spillway.errors import InvalidRequest, KeyNotFound, StartupError
from spillway.ledger.access_tables import API_KEYS, KEY_HASH_CHECK, KEY_REVISION, SETTINGS
from spillway.ledger.sql import SqlLedgerStore

#: how many new prefixes to try before giving up (48 random bits each: never needed twice)
_PREFIX_TRIES = 5


class SecretMismatch(StartupError):
    """The database's keys were hashed under another secret than this process has."""


class KeyStore:
    def __init__(self, database: SqlLedgerStore, hasher: KeyHasher, clock: Clock):
        self._db = database
        self._hasher = hasher
        self._clock = clock

    async def check_secret(self, claim: bool) -> None:
        """Raise ``SecretMismatch`` when the database's keys were hashed under another
        secret. ``claim``: store this secret's check value when none is stored yet (done by
        whoever issues the first key; two at once agree, whichever lands first)."""
        await self._db.open()
        mine = self._hasher.check_value()
        stored = await self._check_value()
        if stored is None and claim:
            async with self._db.writing.begin() as conn:
                await conn.execute(
                    _insert_ignoring(conn, SETTINGS, "name").values(name=KEY_HASH_CHECK, value=mine)
                )
            stored = await self._check_value()
        if stored is not None and stored != mine:
            raise SecretMismatch(
                "the managed keys in this database were hashed under another secret: give "
                "every replica and the CLI the same [server] secret"
            )

    async def has_keys(self) -> bool:
        return await keys_issued(self._db)

    async def _check_value(self) -> str | None:
        return await _check_value(self._db)

    async def create(
        self,
        tenant: str,
        policy: KeyPolicy,
        actor: str,
        name: str | None = None,
        expires_at: datetime | None = None,
    ) -> IssuedKey:
        try:
            check_tenant(tenant)
        except ValueError as exc:
            raise InvalidRequest(f"tenant '{tenant}': {exc}", param="tenant") from None
        await self.check_secret(claim=True)
        now = self._now()
        async with self._db.writing.begin() as conn:
            issued = await self._insert(conn, tenant, policy, actor, name, expires_at, new_key_id())
            detail = _detail(issued.record)
            await record_action(
                conn, now, actor, "key.create", tenant, issued.record.prefix, detail
            )
            await _bump(conn)
        return issued

    async def rotate(
        self, ident: str, actor: str, grace: timedelta | None = None
    ) -> tuple[IssuedKey, ManagedKey]:
        """A new key with the old one's tenant, policy, name, expiry and ``key_id`` (so its
        budget and ledger history carry on); the old one is revoked now, or works on for
        ``grace``. A key already rotated is refused: rotate its successor."""
        await self.check_secret(claim=True)
        now = self._now()
        async with self._db.writing.begin() as conn:
            old = await self._find(conn, ident, usable_at=now, lock=True)
            if old.replaced_by is not None:
                raise InvalidRequest(
                    f"{old.prefix} was rotated already (to {old.replaced_by}); rotate that "
                    "key, or revoke this one to end its grace period."
                )
            issued = await self._insert(
                conn, old.tenant, old.policy, actor, old.name, old.expires_at, old.key_id
            )
            ends = now + grace if grace else None
            changed = await conn.execute(
                update(API_KEYS)
                .where(API_KEYS.c.prefix == old.prefix, API_KEYS.c.revoked_at.is_(None))
                .values(revoked_at=now, grace_until=ends, replaced_by=issued.record.prefix)
            )
            _one_row(changed.rowcount, old.prefix)
            detail = {
                "replaced_by": issued.record.prefix,
                "old_key_ends_at": (ends or now).isoformat(),
            }
            await record_action(conn, now, actor, "key.rotate", old.tenant, old.prefix, detail)
            await _bump(conn)
        return issued, old

    async def revoke(self, ident: str, actor: str) -> ManagedKey:
        """Revoke a usable key at once (a rotated key's grace period ends too)."""
        now = self._now()
        await self._db.open()
        async with self._db.writing.begin() as conn:
            key = await self._find(conn, ident, usable_at=now, lock=True)
            changed = await conn.execute(
                update(API_KEYS)
                .where(API_KEYS.c.prefix == key.prefix, _usable(now))
                .values(revoked_at=now, grace_until=None)
            )
            _one_row(changed.rowcount, key.prefix)
            await record_action(conn, now, actor, "key.revoke", key.tenant, key.prefix, {})
            await _bump(conn)
        return key

    async def find(self, ident: str) -> ManagedKey:
        await self._db.open()
        async with self._db.engine.connect() as conn:
            return await self._find(conn, ident, usable_at=None)

    async def keys(self, include_ended: bool = False) -> list[ManagedKey]:
        await self._db.open()
        stmt = select(API_KEYS).order_by(API_KEYS.c.created_at, API_KEYS.c.prefix)
        if not include_ended:
            now = self._now()
            stmt = stmt.where(_usable(now))
        async with self._db.engine.connect() as conn:
            return [_record(row) for row in await conn.execute(stmt)]

    async def usable(self) -> list[ManagedKey]:
        """The keys that work now: not revoked and not expired (a rotated key in its grace
        period included)."""
        return await self.keys(include_ended=False)

    async def for_gateway(self, remember: timedelta = timedelta(days=30)) -> list[ManagedKey]:
        """What a gateway loads: the usable keys, and those that ended in the last
        ``remember`` (so a client using one is told it was revoked or expired)."""
        await self._db.open()
        since = self._now() - remember
        c = API_KEYS.c
        recent = or_(c.revoked_at.is_(None), c.revoked_at > since, c.grace_until > since) & or_(
            c.expires_at.is_(None), c.expires_at > since
        )
        async with self._db.engine.connect() as conn:
            return [_record(row) for row in await conn.execute(select(API_KEYS).where(recent))]

    async def revision(self) -> int:
        await self._db.open()
        async with self._db.engine.connect() as conn:
            value = await conn.scalar(select(KEY_REVISION.c.revision).where(KEY_REVISION.c.id == 1))
        return int(value or 0)

    async def touch(self, used: Mapping[str, datetime]) -> None:
        """Note when keys were last used (batched by the caller; never moves the revision)."""
        if not used:
            return
        async with self._db.writing.begin() as conn:
            for prefix, at in used.items():
                column = API_KEYS.c.last_used_at
                await conn.execute(
                    update(API_KEYS)
                    .where(API_KEYS.c.prefix == prefix)
                    .where(or_(column.is_(None), column < at))
                    .values(last_used_at=at)
                )

    async def _insert(
        self,
        conn: AsyncConnection,
        tenant: str,
        policy: KeyPolicy,
        actor: str,
        name: str | None,
        expires_at: datetime | None,
        key_id: str,
    ) -> IssuedKey:
        now = self._now()
        for _ in range(_PREFIX_TRIES):
            key = new_key()
            taken = await conn.scalar(
                select(API_KEYS.c.prefix).where(API_KEYS.c.prefix == prefix_of(key))
            )
            if taken is None:
                break
        else:  # pragma: no cover - 48 random bits collided five times in a row
            raise RuntimeError("could not find a free key prefix")
        record = ManagedKey(
            prefix=prefix_of(key),
            key_hash=self._hasher.hash(key),
            key_id=key_id,
            tenant=tenant,
            name=name,
            policy=policy,
            created_at=now,
            created_by=actor,
            expires_at=expires_at,
        )
        await conn.execute(insert(API_KEYS).values(**_row(record)))
        return IssuedKey(key, record)

    async def _find(
        self,
        conn: AsyncConnection,
        ident: str,
        usable_at: datetime | None,
        lock: bool = False,
    ) -> ManagedKey:
        """By the whole key, its prefix, or its key id; ``usable_at``: only a key usable then;
        ``lock``: hold its row until the transaction ends (PostgreSQL; SQLite's IMMEDIATE
        transaction holds the whole database already)."""
        ident = ident.strip()
        if looks_managed(ident):
            where = API_KEYS.c.key_hash == self._hasher.hash(ident)
        elif ident.startswith(KEY_SCHEME) and not is_prefix(ident):
            raise InvalidRequest(
                f"Give a key's prefix ({PREFIX_LENGTH} characters, as `spillway keys list` "
                "shows it), its key id, or the whole key."
            )
        else:
            where = or_(API_KEYS.c.prefix == ident, API_KEYS.c.key_id == ident)
        stmt = select(API_KEYS).where(where)
        if usable_at is not None:
            stmt = stmt.where(_usable(usable_at))
        if lock:
            stmt = stmt.with_for_update()
        rows = list(await conn.execute(stmt))
        if not rows:
            named = f" '{prefix_of(ident)}'" if ident.startswith(KEY_SCHEME) else ""
            raise KeyNotFound(
                f"No {'usable ' if usable_at else ''}managed key has that prefix, key id or "
                f"key{named}. `spillway keys list` shows them; keys written in [[keys]] are "
                "changed in spillway.toml."
            )
        if len(rows) > 1:
            raise InvalidRequest(
                f"That key id names {len(rows)} keys (a rotated key and its successor): give "
                "the key's prefix instead."
            )
        return _record(rows[0])

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.wall(), UTC)


async def keys_issued(database: SqlLedgerStore) -> bool:
    """Whether any managed key was ever issued in this database (the secret's check value is
    stored with the first): if so, a gateway is never open, whatever it can read of them."""
    await database.open()
    return await _check_value(database) is not None


async def _check_value(database: SqlLedgerStore) -> str | None:
    async with database.engine.connect() as conn:
        value = await conn.scalar(select(SETTINGS.c.value).where(SETTINGS.c.name == KEY_HASH_CHECK))
    return None if value is None else str(value)


def _usable(now: datetime) -> Any:
    c = API_KEYS.c
    return or_(c.revoked_at.is_(None), c.grace_until > now) & or_(
        c.expires_at.is_(None), c.expires_at > now
    )


def _one_row(count: int, prefix: str) -> None:
    """A conditional update changed nothing: another change to the key got there first."""
    if count != 1:
        raise InvalidRequest(f"{prefix} changed meanwhile (revoked or rotated); look again.")


def _insert_ignoring(conn: AsyncConnection, table: Any, key: str) -> Any:
    """INSERT … ON CONFLICT (key) DO NOTHING, in the connection's dialect."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(table).on_conflict_do_nothing(index_elements=[key])


async def _bump(conn: AsyncConnection) -> None:
    await conn.execute(
        update(KEY_REVISION)
        .where(KEY_REVISION.c.id == 1)
        .values(revision=KEY_REVISION.c.revision + 1)
    )


def _row(record: ManagedKey) -> dict[str, Any]:
    return {
        "prefix": record.prefix,
        "key_hash": record.key_hash,
        "key_id": record.key_id,
        "tenant": record.tenant,
        "name": record.name,
        "policy": record.policy.model_dump_json(exclude_defaults=True),
        "created_at": record.created_at,
        "created_by": record.created_by,
        "expires_at": record.expires_at,
    }


def _record(row: Row[Any]) -> ManagedKey:
    m = row._mapping
    return ManagedKey(
        prefix=m["prefix"],
        key_hash=m["key_hash"],
        key_id=m["key_id"],
        tenant=m["tenant"],
        name=m["name"],
        policy=KeyPolicy.model_validate_json(m["policy"]),
        created_at=m["created_at"],
        created_by=m["created_by"],
        expires_at=m["expires_at"],
        revoked_at=m["revoked_at"],
        grace_until=m["grace_until"],
        last_used_at=m["last_used_at"],
        replaced_by=m["replaced_by"],
    )


def _detail(record: ManagedKey) -> dict[str, Any]:
    """What an audit row says of a new key: its policy and expiry, never the key or hash."""
    detail: dict[str, Any] = orjson.loads(record.policy.model_dump_json(exclude_defaults=True))
    detail["key_id"] = record.key_id
    if record.name:
        detail["name"] = record.name
    if record.expires_at is not None:
        detail["expires_at"] = record.expires_at.isoformat()
    return detail
