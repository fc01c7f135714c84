"""The OpenAI Files and Batches APIs: ``/v1/files`` and ``/v1/batches``.

Thin adapters over ``batch/``: uploads stream into the object store as they arrive, file
contents stream back out, and every call sees only the caller's tenant (another tenant's
file or batch is answered as one that does not exist).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import orjson
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from spillway.batch.catalog import UPLOAD_PURPOSES
from spillway.batch.records import FileRecord
from spillway.batch.service import Batches, delete_unused
from spillway.errors import InvalidRequest, PayloadTooLarge, SpillwayError
from spillway.server.body import read_within_limits
from spillway.server.middleware import CLOSE_CONNECTION, principal_of
from spillway.server.state import GATEWAY, Gateway
from spillway.wire.requests import CONTROL_CHARS

UPLOAD_CHUNK = 1024 * 1024
#: the longest a purpose part is read (the longest purpose is a few characters)
_MAX_PURPOSE = 100
T = TypeVar("T")
_MAX_PAGE = 10_000
#: room for the form's other parts and its boundaries, past the file itself
_FORM_OVERHEAD = 64 * 1024


async def upload_file(request: web.Request) -> web.Response:
    gateway, batches = _batches(request)
    limit = batches.config.max_file_bytes
    if request.content_length is not None and request.content_length > limit + _FORM_OVERHEAD:
        raise PayloadTooLarge(f"The file is larger than {limit} bytes ([batch] max_file_bytes).")
    if request.content_type != "multipart/form-data":
        raise InvalidRequest("Upload files as multipart/form-data, with 'file' and 'purpose'.")
    principal = principal_of(request)
    form = _Form(batches, principal.tenant, principal.key_id, gateway.config.server.body_timeout_s)
    try:
        async with asyncio.timeout(batches.config.upload_timeout_s):
            await form.read(request)
    except BaseException as exc:
        await form.discard()  # nothing half-uploaded stays listed
        request[CLOSE_CONNECTION] = True
        raise _upload_error(exc) from None
    if form.purpose not in UPLOAD_PURPOSES:
        await form.discard()
        raise InvalidRequest(
            f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}", param="purpose"
        )
    if form.record is None:
        raise InvalidRequest("The form has no 'file' part.", param="file")
    return _json(form.record.public())


class _Form:
    """An upload's form, read as it arrives: one ``purpose`` and one ``file``, nothing else
    (a form of thousands of parts would hold the event loop), each chunk within the body
    timeout of the one before (a client trickling bytes would hold a connection)."""

    def __init__(self, batches: Batches, tenant: str, key_id: str, stall_s: float):
        self._batches, self._tenant, self._key_id = batches, tenant, key_id
        self._stall_s = stall_s
        self.purpose: str | None = None
        self.record: FileRecord | None = None

    async def read(self, request: web.Request) -> None:
        reader = await request.multipart()
        seen: set[str] = set()
        while (part := await self._within(reader.next())) is not None:
            name = part.name if isinstance(part, BodyPartReader) else None
            if name not in ("purpose", "file") or name in seen:
                raise InvalidRequest(
                    "The form may hold one 'purpose' and one 'file' part, nothing else."
                )
            assert isinstance(part, BodyPartReader)
            seen.add(name)
            if name == "purpose":
                raw = await self._within(part.read_chunk(_MAX_PURPOSE))
                self.purpose = raw.decode("utf-8", "replace").strip()
                await self._within(part.release())
            elif self.purpose is not None and self.purpose not in UPLOAD_PURPOSES:
                return  # refused before the file: do not store it
            else:
                self.record = await self._batches.files.upload(
                    self._tenant, self._key_id, "batch", _filename(part.filename),
                    self._chunks(part), self._batches.config.max_file_bytes,
                )  # fmt: skip

    async def _chunks(self, part: BodyPartReader) -> AsyncIterator[bytes]:
        while chunk := await self._within(part.read_chunk(UPLOAD_CHUNK)):
            yield chunk

    async def _within(self, step: Awaitable[T]) -> T:
        async with asyncio.timeout(self._stall_s):
            return await step

    async def discard(self) -> None:
        record, self.record = self.record, None
        if record is not None:
            with contextlib.suppress(Exception):
                await self._batches.files.delete(self._tenant, record.id)


def _filename(raw: str | None) -> str:
    """The name the client gave, as text fit to store and show: no control characters, no
    lone surrogates, at most 255 characters."""
    name = CONTROL_CHARS.sub("", (raw or "upload.jsonl")[:255])
    return name.encode("utf-8", "replace").decode("utf-8") or "upload.jsonl"


def _upload_error(exc: BaseException) -> BaseException:
    if isinstance(exc, SpillwayError):
        return exc
    if isinstance(exc, TimeoutError):
        slow = InvalidRequest("The upload stalled or took too long; send it at a steady pace.")
        slow.status, slow.code = 408, "upload_timeout"
        return slow
    if isinstance(exc, (ValueError, RecursionError, HttpProcessingError)):
        return InvalidRequest("The multipart form is malformed.", code="invalid_multipart")
    return exc


async def list_files(request: web.Request) -> web.Response:
    _, batches = _batches(request)
    query = request.query
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("order must be asc or desc", param="order")
    records, more = await batches.files.page(
        principal_of(request).tenant,
        query.get("purpose"),
        _limit(query.get("limit"), 10_000),
        query.get("after"),
        newest_first=order == "desc",
    )
    return _json(_page([r.public() for r in records], more))


async def get_file(request: web.Request) -> web.Response:
    _, batches = _batches(request)
    record = await batches.files.get(principal_of(request).tenant, request.match_info["file_id"])
    return _json(record.public())


async def file_content(request: web.Request) -> web.StreamResponse:
    gateway, batches = _batches(request)
    record = await batches.files.get(principal_of(request).tenant, request.match_info["file_id"])
    response = web.StreamResponse(
        headers={"Content-Type": "application/octet-stream", "Content-Length": str(record.bytes)}
    )
    await response.prepare(request)
    stall_s = gateway.config.server.body_timeout_s
    async for chunk in batches.files.content(record):
        try:
            async with asyncio.timeout(stall_s):  # a client that stops reading is dropped
                await response.write(chunk)
        except TimeoutError:
            if request.transport is not None:
                request.transport.abort()
            return response
    await response.write_eof()
    return response


async def delete_file(request: web.Request) -> web.Response:
    _, batches = _batches(request)
    tenant, file_id = principal_of(request).tenant, request.match_info["file_id"]
    record = await delete_unused(batches, tenant, file_id)
    return _json({"id": record.id, "object": "file", "deleted": True})


async def create_batch(request: web.Request) -> web.Response:
    gateway, batches = _batches(request)
    raw = await read_within_limits(request, gateway.config.server)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    record = await batches.create(principal_of(request), body)
    return _json(record.public())


async def get_batch(request: web.Request) -> web.Response:
    _, batches = _batches(request)
    record = await batches.jobs.get(principal_of(request).tenant, request.match_info["batch_id"])
    return _json(record.public())


async def cancel_batch(request: web.Request) -> web.Response:
    _, batches = _batches(request)
    tenant = principal_of(request).tenant
    record = await batches.jobs.cancel(tenant, request.match_info["batch_id"])
    return _json(record.public())


async def list_batches(request: web.Request) -> web.Response:
    _, batches = _batches(request)
    query = request.query
    records, more = await batches.jobs.page(
        principal_of(request).tenant, _limit(query.get("limit"), 100), query.get("after")
    )
    return _json(_page([r.public() for r in records], more))


def _batches(request: web.Request) -> tuple[Gateway, Batches]:
    gateway = request.app[GATEWAY]
    if gateway.batches is None:
        error = SpillwayError(
            "Files and batches need the ledger's database ([ledger] enabled) and storage."
        )
        error.status, error.code = 503, "batches_off"
        raise error
    return gateway, gateway.batches


def _limit(value: str | None, most: int) -> int:
    if value is None:
        return min(20, most)
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if not 1 <= limit <= min(most, _MAX_PAGE):
        raise InvalidRequest(f"limit must be from 1 to {min(most, _MAX_PAGE)}", param="limit")
    return limit


def _page(data: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": more,
    }


def _json(body: dict[str, Any]) -> web.Response:
    return web.Response(body=orjson.dumps(body), content_type="application/json")
