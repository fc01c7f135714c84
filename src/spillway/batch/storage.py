"""Where uploaded files and batch results are kept: a local directory, or any S3-compatible
object store (AWS, MinIO, SeaweedFS, Ceph RGW, the S3 APIs of Huawei OBS and Alibaba OSS).

Both stream: ``write`` takes an async iterable of chunks and ``read`` yields chunks, so a
file of any size passes through in bounded memory. A written object appears whole or not at
all: a local file is written under a temporary name, fsynced and renamed; an S3 object is
one ``PutObject``, or a multipart upload (parts of ``[storage] part_bytes``) completed at the
end and aborted on any failure.

The S3 client (``aiobotocore``, the ``s3`` extra) is imported only when an ``s3://`` store is
configured. Credentials: ``[storage]``'s, else the standard chain (``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY``, profiles, instance roles).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from spillway.config.batch import StorageConfig
from spillway.errors import StartupError

READ_CHUNK = 1024 * 1024


class ObjectStore(Protocol):
    async def open(self) -> None: ...

    async def write(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        """Store the object whole; returns its size in bytes."""
        ...

    def read(self, key: str) -> AsyncIterator[bytes]:
        """The object's bytes, a chunk at a time; ``FileNotFoundError`` if there is none."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the object (none there is not an error)."""
        ...

    async def aclose(self) -> None: ...


class LocalStore:
    """Objects as files under one directory (keys are relative paths)."""

    def __init__(self, root: Path):
        self._root = root

    async def open(self) -> None:
        await asyncio.to_thread(self._root.mkdir, parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self._root / key).resolve()
        if not path.is_relative_to(self._root.resolve()):
            raise ValueError(f"object key {key!r} leaves the store")
        return path

    async def write(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        path = self._path(key)
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        # random: replicas in containers (each pid 1) may share the directory
        partial = path.with_name(f".{path.name}.{secrets.token_hex(8)}.partial")
        out = await asyncio.to_thread(partial.open, "wb")
        size = 0
        try:
            async for chunk in chunks:
                await asyncio.to_thread(out.write, chunk)
                size += len(chunk)
            await asyncio.to_thread(_sync_and_close, out)
            await asyncio.to_thread(os.replace, partial, path)
        except BaseException:
            out.close()
            partial.unlink(missing_ok=True)
            raise
        return size

    async def read(self, key: str) -> AsyncIterator[bytes]:
        source = await asyncio.to_thread(self._path(key).open, "rb")
        try:
            while chunk := await asyncio.to_thread(source.read, READ_CHUNK):
                yield chunk
        finally:
            source.close()

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._path(key).unlink, missing_ok=True)

    async def aclose(self) -> None:
        """Nothing is held open between calls."""


def _sync_and_close(out: Any) -> None:
    out.flush()
    os.fsync(out.fileno())
    out.close()


class S3Store:
    """Objects in one bucket, under one prefix."""

    def __init__(self, config: StorageConfig, bucket: str, prefix: str):
        self._config = config
        self._bucket = bucket
        self._prefix = prefix.strip("/")
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    def _key(self, key: str) -> str:
        return f"{self._prefix}/{key}" if self._prefix else key

    async def open(self) -> None:
        if self._client is not None:
            return
        try:
            from aiobotocore.config import AioConfig
            from aiobotocore.session import get_session
        except ImportError:
            raise StartupError(
                "[storage] url is s3://… but the S3 client is not installed: "
                "pip install 'spillway[s3]'"
            ) from None
        c = self._config
        style = {"addressing_style": "path" if c.path_style else "auto"}
        options: dict[str, Any] = {
            "region_name": c.region,
            "config": AioConfig(s3=style, retries={"max_attempts": 3, "mode": "standard"}),
        }
        if c.endpoint_url:
            options["endpoint_url"] = c.endpoint_url
        if c.access_key_id is not None and c.secret_access_key is not None:
            options["aws_access_key_id"] = c.access_key_id.get_secret_value()
            options["aws_secret_access_key"] = c.secret_access_key.get_secret_value()
        creator = get_session().create_client("s3", **options)
        self._client = await self._stack.enter_async_context(creator)
        try:
            await self._ensure_bucket()
        except BaseException:
            await self.aclose()
            raise

    async def _ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            await self._client.head_bucket(Bucket=self._bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code not in ("404", "NoSuchBucket", "NotFound"):
                raise StartupError(
                    f"[storage] bucket '{self._bucket}' cannot be used: {code or 'error'}"
                ) from None
            try:
                await self._client.create_bucket(Bucket=self._bucket)
            except ClientError as exc:  # another replica made it at the same moment
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    async def write(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        part_bytes = self._config.part_bytes
        buffer = bytearray()
        upload: _Multipart | None = None
        size = 0
        try:
            async for chunk in chunks:
                buffer += chunk
                size += len(chunk)
                while len(buffer) >= part_bytes:
                    if upload is None:
                        upload = await _Multipart.begin(self._client, self._bucket, self._key(key))
                    await upload.send(bytes(buffer[:part_bytes]))
                    del buffer[:part_bytes]
            if upload is None:
                await self._client.put_object(
                    Bucket=self._bucket, Key=self._key(key), Body=bytes(buffer)
                )
                return size
            if buffer:
                await upload.send(bytes(buffer))
            await upload.complete()
        except BaseException:
            if upload is not None:
                await asyncio.shield(upload.abort())
            raise
        return size

    async def read(self, key: str) -> AsyncIterator[bytes]:
        from botocore.exceptions import ClientError

        try:
            reply = await self._client.get_object(Bucket=self._bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(key) from None
            raise
        body = reply["Body"]
        try:
            async for chunk in body.iter_chunks(READ_CHUNK):
                yield chunk
        finally:
            body.close()

    async def delete(self, key: str) -> None:
        await self._client.delete_object(Bucket=self._bucket, Key=self._key(key))

    async def aclose(self) -> None:
        await self._stack.aclose()
        self._client = None


class _Multipart:
    """One multipart upload: its parts in order, completed or aborted once."""

    def __init__(self, client: Any, bucket: str, key: str, upload_id: str):
        self._client, self._bucket, self._key, self._id = client, bucket, key, upload_id
        self._parts: list[dict[str, Any]] = []

    @classmethod
    async def begin(cls, client: Any, bucket: str, key: str) -> _Multipart:
        reply = await client.create_multipart_upload(Bucket=bucket, Key=key)
        return cls(client, bucket, key, reply["UploadId"])

    async def send(self, data: bytes) -> None:
        number = len(self._parts) + 1
        reply = await self._client.upload_part(
            Bucket=self._bucket, Key=self._key, UploadId=self._id, PartNumber=number, Body=data
        )
        self._parts.append({"ETag": reply["ETag"], "PartNumber": number})

    async def complete(self) -> None:
        await self._client.complete_multipart_upload(
            Bucket=self._bucket,
            Key=self._key,
            UploadId=self._id,
            MultipartUpload={"Parts": self._parts},
        )

    async def abort(self) -> None:
        with contextlib.suppress(Exception):  # best effort: a lifecycle rule cleans up the rest
            await self._client.abort_multipart_upload(
                Bucket=self._bucket, Key=self._key, UploadId=self._id
            )


def store_for(config: StorageConfig, data_dir: Path) -> ObjectStore:
    """``[storage] url`` as a store: DATA_DIR/files by default."""
    if config.url is None:
        return LocalStore(data_dir / "files")
    parts = urlsplit(config.url)
    if parts.scheme == "file":
        return LocalStore(Path(parts.path))
    return S3Store(config, parts.netloc, parts.path)
