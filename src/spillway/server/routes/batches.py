"""The OpenAI Files and Batches APIs: ``/v1/files`` and ``/v1/batches``.

Thin adapters over ``batch/``: uploads stream into the object store as they arrive, file
contents stream back out, and every call sees only the caller's tenant (another tenant's
file or batch is answered as one that does not exist).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import BodyPartReader, web

from spillway.batch.catalog import UPLOAD_PURPOSES
from spillway.batch.service import Batches, delete_unused
from spillway.errors import InvalidRequest, PayloadTooLarge, SpillwayError
from spillway.server.body import read_within_limits
from spillway.server.middleware import principal_of
from spillway.server.state import GATEWAY, Gateway

UPLOAD_CHUNK = 1024 * 1024
_MAX_PAGE = 10_000
#: room for the form's other parts and its boundaries, past the file itself
_FORM_OVERHEAD = 64 * 1024


async def upload_file(request: web.Request) -> web.Response:
    _, batches = _batches(request)
    limit = batches.config.max_file_bytes
    if request.content_length is not None and request.content_length > limit + _FORM_OVERHEAD:
        raise PayloadTooLarge(f"The file is larger than {limit} bytes ([batch] max_file_bytes).")
    if request.content_type != "multipart/form-data":
        raise InvalidRequest("Upload files as multipart/form-data, with 'file' and 'purpose'.")
    principal = principal_of(request)
    try:
        async with asyncio.timeout(batches.config.upload_timeout_s):
            purpose, record = await _read_form(request, batches, principal.tenant, principal.key_id)
    except TimeoutError:
        slow = InvalidRequest("The upload took too long ([batch] upload_timeout_s).")
        slow.status, slow.code = 408, "upload_timeout"
        raise slow from None
    if purpose not in UPLOAD_PURPOSES:
        if record is not None:  # the purpose came after the file
            await batches.files.delete(principal.tenant, record.id)
        raise InvalidRequest(
            f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}", param="purpose"
        )
    if record is None:
        raise InvalidRequest("The form has no 'file' part.", param="file")
    return _json(record.public())


async def _read_form(
    request: web.Request, batches: Batches, tenant: str, key_id: str
) -> tuple[str | None, Any]:
    reader = await request.multipart()
    purpose: str | None = None
    record = None
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            continue
        refused = purpose is not None and purpose not in UPLOAD_PURPOSES
        if part.name == "purpose":
            purpose = (await part.read(decode=True))[:100].decode("utf-8", "replace").strip()
        elif part.name == "file" and record is None and not refused:
            filename = (part.filename or "upload.jsonl")[:255]
            record = await batches.files.upload(
                tenant, key_id, "batch", filename, _chunks(part), batches.config.max_file_bytes
            )
        else:
            await part.release()
    return purpose, record


async def _chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(UPLOAD_CHUNK):
        yield chunk


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
    _, batches = _batches(request)
    record = await batches.files.get(principal_of(request).tenant, request.match_info["file_id"])
    response = web.StreamResponse(
        headers={"Content-Type": "application/octet-stream", "Content-Length": str(record.bytes)}
    )
    await response.prepare(request)
    async for chunk in batches.files.content(record):
        await response.write(chunk)
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
