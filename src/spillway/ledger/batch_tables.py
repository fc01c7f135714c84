"""The tables of batch jobs and their files, in the ledger's database (migration 4).

- ``files``: uploaded files and batch results (``/v1/files``); the bytes are in the object
  store (``batch/storage.py``) under ``object_key``.
- ``batches``: one row per batch (``/v1/batches``): its state, counts, timestamps, the
  submitting key's policy, and the lease of the replica working it.
- ``batch_segments``: the durable progress of a batch. Each row is a piece of output (and
  error output) already written to the object store, with the input lines it answers. A
  line is done exactly when a committed segment holds it: a crash re-runs only lines no
  segment holds, and the final files are the segments joined, so every line appears once.
- ``ledger.batch_id``: which batch a ledger record's request belonged to.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
)

from spillway.ledger.sql_types import UtcTimestamp


def _batch_v4(metadata: MetaData) -> tuple[Table, Table, Table]:
    """The tables as migration 4 creates them; a later change is a new migration."""
    files = Table(
        "files",
        metadata,
        Column("id", Text, primary_key=True),
        Column("tenant", Text, nullable=False),
        Column("key_id", Text, nullable=False),
        Column("purpose", Text, nullable=False),
        Column("filename", Text, nullable=False),
        Column("bytes", BigInteger, nullable=False),
        Column("object_key", Text, nullable=False),
        Column("created_at", UtcTimestamp, nullable=False),
        Column("deleted_at", UtcTimestamp),
        Index("files_tenant_created", "tenant", "created_at"),
    )
    times = (
        "created_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at",
        "expired_at", "cancelling_at", "cancelled_at", "expires_at",
    )  # fmt: skip
    batches = Table(
        "batches",
        metadata,
        Column("id", Text, primary_key=True),
        Column("tenant", Text, nullable=False),
        Column("key_id", Text, nullable=False),
        Column("principal", Text, nullable=False),
        Column("endpoint", Text, nullable=False),
        Column("input_file_id", Text, nullable=False),
        Column("completion_window", Text, nullable=False),
        Column("metadata", Text),
        Column("status", Text, nullable=False),
        Column("errors", Text),
        Column("output_file_id", Text),
        Column("error_file_id", Text),
        *(Column(name, UtcTimestamp) for name in times),
        Column("total", BigInteger, nullable=False, server_default="0"),
        Column("completed", BigInteger, nullable=False, server_default="0"),
        Column("failed", BigInteger, nullable=False, server_default="0"),
        Column("lease_owner", Text),
        Column("lease_until", UtcTimestamp),
        Index("batches_tenant_created", "tenant", "created_at"),
        Index("batches_status", "status"),
    )
    segments = Table(
        "batch_segments",
        metadata,
        Column("batch_id", Text, nullable=False),
        Column("seq", Integer, nullable=False),
        Column("output_key", Text),
        Column("error_key", Text),
        #: the input line numbers this segment answers (``jobs.pack_lines``)
        Column("lines", LargeBinary, nullable=False),
        Column("completed", Integer, nullable=False),
        Column("failed", Integer, nullable=False),
        Column("written_at", UtcTimestamp, nullable=False),
        PrimaryKeyConstraint("batch_id", "seq"),
    )
    return files, batches, segments


BATCH_METADATA = MetaData()
FILES, BATCHES, BATCH_SEGMENTS = _batch_v4(BATCH_METADATA)


def create_batch_v4(conn: Connection) -> None:
    """Migration 4: the batch tables, and the ledger's ``batch_id`` column."""
    metadata = MetaData()
    metadata.create_all(conn, tables=list(_batch_v4(metadata)))
    conn.exec_driver_sql("ALTER TABLE ledger ADD COLUMN batch_id TEXT")
