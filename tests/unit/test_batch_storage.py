"""The object stores batch files go to: a local directory, and a real S3 server (SeaweedFS):
whole objects only, streamed both ways, multipart for large ones, nothing left by a failed
write."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from spillway.batch.storage import LocalStore, ObjectStore, S3Store, store_for
from spillway.config.batch import StorageConfig
from tests.s3_server import S3Server, s3_server

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server


@pytest.fixture(params=["local", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ObjectStore]:
    if request.param == "local":
        made: ObjectStore = LocalStore(tmp_path / "files")
    else:
        server: S3Server = request.getfixturevalue("s3")
        config = StorageConfig.model_validate(
            {**server.storage(f"b{os.urandom(4).hex()}"), "part_bytes": 5 * MIB}
        )
        made = store_for(config, tmp_path)
        assert isinstance(made, S3Store)
    await made.open()
    yield made
    await made.aclose()


async def chunks(total: int, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield bytes([sent // size % 251]) * n
        sent += n


async def read_all(store: ObjectStore, key: str) -> bytes:
    return b"".join([c async for c in store.read(key)])


async def test_small_and_multipart_objects_round_trip(store):
    assert await store.write("a/small.jsonl", chunks(1000)) == 1000
    assert await read_all(store, "a/small.jsonl") == b"".join([c async for c in chunks(1000)])
    size = 12 * MIB + 123  # three parts of 5 MiB on S3
    assert await store.write("a/big.jsonl", chunks(size)) == size
    got = await read_all(store, "a/big.jsonl")
    assert len(got) == size and got == b"".join([c async for c in chunks(size)])
    await store.delete("a/big.jsonl")
    with pytest.raises(FileNotFoundError):
        await read_all(store, "a/big.jsonl")
    await store.delete("a/never-there")  # not an error


async def test_a_failed_write_leaves_nothing(store):
    async def broken() -> AsyncIterator[bytes]:
        async for chunk in chunks(11 * MIB):
            yield chunk
        raise RuntimeError("the client went away")

    with pytest.raises(RuntimeError):
        await store.write("a/broken.jsonl", broken())
    with pytest.raises(FileNotFoundError):
        await read_all(store, "a/broken.jsonl")


def test_storage_urls_are_checked():
    for good in ("file:///srv/spillway", "s3://bucket", "s3://bucket/a/b"):
        StorageConfig(url=good)
    for bad in ("file://relative", "s3://", "http://x", "/srv/x"):
        with pytest.raises(ValueError, match="file:///"):
            StorageConfig(url=bad)
    with pytest.raises(ValueError):
        StorageConfig(part_bytes=1024)  # below S3's 5 MiB minimum part
