"""Ledger records kept on local disk while the store cannot take them.

When a write fails (PostgreSQL down, say), the writer moves the records it holds here instead
of keeping them in memory, and writes them to the store once it takes writes again: oldest
segment first, each removed only after the store has committed it. A crash between the two
writes the segment again, which the store ignores (it keeps the first record of a
``request_id``): every record reaches the store exactly once. A process restarted during the
outage finds the segments and carries on; nothing spooled is lost to a restart.

One file per spilled batch (at most ``MAX_BATCH`` records), named by the time it was written,
the process that wrote it and how many records it holds, written to a temporary name,
fsynced, then renamed into place: a file in the directory is always whole. One that cannot
be read all the same (a damaged disk, another version's format) is renamed ``….bad`` and
logged, so that it never holds up the files behind it. Each line is one record as JSON:
amounts as exact decimal text, the time as ISO 8601 with its offset.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, fields
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from spillway.ledger.records import LedgerRecord

_MONEY = tuple(f.name for f in fields(LedgerRecord) if f.type in ("Decimal", Decimal))
_SUFFIX = ".jsonl"


class Spool:
    """A directory of spilled record batches. Blocking file I/O: call it in a thread."""

    def __init__(self, directory: Path):
        self.directory = directory

    def append(self, records: Sequence[LedgerRecord]) -> Path:
        """Write ``records`` as one new segment, durably; returns its path."""
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}-{os.getpid()}-{len(records)}{_SUFFIX}"
        final = self.directory / name
        partial = final.with_name(name + ".partial")
        body = b"".join(orjson.dumps(asdict(r), default=_encode) + b"\n" for r in records)
        with partial.open("wb") as out:
            out.write(body)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, final)
        _sync_directory(self.directory)
        return final

    def segments(self) -> list[Path]:
        """Whole segments, oldest first (a ``.partial`` left by a crash is not one)."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if p.name.endswith(_SUFFIX))

    def count(self) -> int:
        """Records waiting on disk (from the segments' names: no file is read; a file named
        otherwise counts as one)."""
        return sum(_records_named(p.name) for p in self.segments())

    def read(self, segment: Path) -> list[LedgerRecord]:
        return [_decode(line) for line in segment.read_bytes().splitlines() if line]

    def remove(self, segment: Path) -> None:
        segment.unlink(missing_ok=True)

    def set_aside(self, segment: Path) -> Path:
        """A segment that cannot be read (damaged, or not ours): renamed ``….bad`` so that
        it no longer holds up the ones behind it, and kept for an operator to look at."""
        bad = segment.with_name(segment.name + ".bad")
        os.replace(segment, bad)
        return bad


def _records_named(name: str) -> int:
    count = name.removesuffix(_SUFFIX).rpartition("-")[2]
    return int(count) if count.isdigit() else 1


def _encode(value: Any) -> str:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"cannot spool a {type(value).__name__}")


def _decode(line: bytes) -> LedgerRecord:
    raw = orjson.loads(line)
    raw["at"] = datetime.fromisoformat(raw["at"])
    for name in _MONEY:
        raw[name] = Decimal(raw[name])
    return LedgerRecord(**raw)


def _sync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX: the directory entry is data of the directory)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
