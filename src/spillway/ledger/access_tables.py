"""The tables of managed API keys and the audit trail, in the ledger's database (migration 3).

- ``api_keys``: one row per issued key. Only the key's HMAC under the server secret is kept
  (``key_hash``), with its public ``prefix`` (how people name it) and ``key_id`` (how the
  ledger and budgets name it; a rotated key's successor keeps it). ``policy`` is the key's
  ``KeyPolicy`` as JSON: the same fields ``[[keys]]`` takes.
- ``key_revision``: one row whose number goes up with every change to ``api_keys`` (in the
  same transaction), so a running gateway sees a change by reading one integer.
- ``settings``: named values; ``key_hash_check`` proves which secret the keys were hashed
  under, so a replica with another secret says so instead of refusing every managed key.
- ``audit``: admin actions (key create, revoke, rotate; cache clear). Personal-data decisions
  are on the request's own ledger row (``pii_action``, ``pii_kinds``): one row per request,
  written with it.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    insert,
)

from spillway.ledger.sql_types import UtcTimestamp

#: an id that counts up: BIGSERIAL on PostgreSQL, the rowid on SQLite
_SERIAL = BigInteger().with_variant(Integer, "sqlite")
KEY_HASH_CHECK = "key_hash_check"


def _access_v3(metadata: MetaData) -> tuple[Table, Table, Table, Table]:
    """The tables as migration 3 creates them; a later change is a new migration."""
    keys = Table(
        "api_keys",
        metadata,
        Column("prefix", Text, primary_key=True),
        Column("key_hash", Text, nullable=False, unique=True),
        Column("key_id", Text, nullable=False),
        Column("tenant", Text, nullable=False),
        Column("name", Text),
        Column("policy", Text, nullable=False),
        Column("created_at", UtcTimestamp, nullable=False),
        Column("created_by", Text, nullable=False),
        Column("expires_at", UtcTimestamp),
        Column("revoked_at", UtcTimestamp),
        #: a rotated key's grace period: it works until then though revoked (NULL: none)
        Column("grace_until", UtcTimestamp),
        Column("last_used_at", UtcTimestamp),
        Column("replaced_by", Text),
        Index("api_keys_key_id", "key_id"),
    )
    revision = Table(
        "key_revision",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("revision", BigInteger, nullable=False),
    )
    settings = Table(
        "settings",
        metadata,
        Column("name", Text, primary_key=True),
        Column("value", Text, nullable=False),
    )
    audit = Table(
        "audit",
        metadata,
        Column("id", _SERIAL, primary_key=True, autoincrement=True),
        Column("at", UtcTimestamp, nullable=False),
        Column("actor", Text, nullable=False),
        Column("action", Text, nullable=False),
        Column("tenant", Text),
        Column("target", Text),
        Column("detail", Text, nullable=False),
        Index("audit_at", "at"),
    )
    return keys, revision, settings, audit


ACCESS_METADATA = MetaData()
API_KEYS, KEY_REVISION, SETTINGS, AUDIT = _access_v3(ACCESS_METADATA)


def create_access_v3(conn: Connection) -> None:
    """Migration 3: the key and audit tables, the revision row, and the ledger's columns
    for personal-data decisions."""
    metadata = MetaData()
    tables = _access_v3(metadata)
    metadata.create_all(conn, tables=list(tables))
    conn.execute(insert(tables[1]).values(id=1, revision=0))
    for column in ("pii_action", "pii_kinds"):
        conn.exec_driver_sql(f"ALTER TABLE ledger ADD COLUMN {column} TEXT")
