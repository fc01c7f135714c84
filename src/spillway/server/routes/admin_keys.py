"""``/admin/keys`` and ``/admin/audit``: managed keys and the audit trail over HTTP.

- ``GET /admin/keys`` (``?all=true`` with revoked and expired ones): never a key or hash.
- ``POST /admin/keys``: a ``KeyRequest`` as JSON; 201 with ``key``, shown this once.
- ``POST /admin/keys/{prefix}/revoke`` (or ``DELETE /admin/keys/{prefix}``).
- ``POST /admin/keys/{prefix}/rotate`` with ``{"grace": "1h"}`` optional: 201 with the new key.
- ``GET /admin/audit`` (``?since=7d&kind=admin|pii&tenant=T&limit=N``).

A key is named by its prefix or key id, never the whole key: a URL ends up in access logs
and proxies. Every change is audited with the admin key that made it, and takes effect on
this replica before the answer (on the others within a poll).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from spillway.access.audit import EventKind
from spillway.access.records import KeyRequest, explain, parse_duration, unserved_models
from spillway.access.tokens import KEY_SCHEME, PREFIX_LENGTH
from spillway.errors import InvalidRequest, SpillwayError
from spillway.server.body import read_within_limits
from spillway.server.key_sync import Access
from spillway.server.middleware import principal_of
from spillway.server.routes.admin import require_admin
from spillway.server.state import GATEWAY, Gateway

_MAX_LIMIT = 10_000


async def list_keys(request: web.Request) -> web.Response:
    gateway, access = _admin(request)
    everything = request.query.get("all", "").lower() in ("1", "true", "yes")
    now = _now(gateway)
    keys = await access.store.keys(include_ended=everything)
    return _json({"object": "list", "data": [k.public(now) for k in keys]})


async def create_key(request: web.Request) -> web.Response:
    gateway, access = _admin(request)
    body = orjson.loads(await _json_body(request, gateway))
    _plain_types(body)
    try:
        wanted = KeyRequest.model_validate(body)
    except ValidationError as exc:
        raise InvalidRequest(f"Invalid key request: {explain(exc)}") from None
    unknown = unserved_models(wanted, gateway.config.public_models())
    if unknown:
        raise InvalidRequest(f"models: no node serves {', '.join(unknown)}", param="models")
    now = _now(gateway)
    issued = await access.store.create(
        wanted.tenant, wanted.policy, _actor(request, gateway), wanted.name, wanted.expires_at(now)
    )
    await _take_effect(access)
    return _json({"key": issued.key, **issued.record.public(now)}, status=201, secret=True)


async def revoke_key(request: web.Request) -> web.Response:
    gateway, access = _admin(request)
    revoked = await access.store.revoke(_ident(request), _actor(request, gateway))
    await _take_effect(access)
    now = _now(gateway)
    return _json({**revoked.public(now), "state": "revoked", "revoked_at": _iso(now)})


async def rotate_key(request: web.Request) -> web.Response:
    gateway, access = _admin(request)
    ident = _ident(request)
    raw = await _json_body(request, gateway, optional=True)
    body = orjson.loads(raw) if raw else {}
    grace = body.get("grace")
    if grace is not None and not isinstance(grace, str):
        raise InvalidRequest("grace: write a duration such as '1h' or '30m'", param="grace")
    try:
        window = parse_duration(grace) if grace else None
    except ValueError as exc:
        raise InvalidRequest(f"grace: {exc}", param="grace") from None
    issued, old = await access.store.rotate(ident, _actor(request, gateway), window)
    await _take_effect(access)
    now = _now(gateway)
    answer = {"key": issued.key, **issued.record.public(now), "replaces": old.prefix}
    return _json(answer, 201, secret=True)


async def audit(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    access = _admin(request)[1]
    query = request.query
    kind = query.get("kind", "all")
    kinds: dict[str, frozenset[EventKind]] = {
        "all": frozenset({"admin", "pii"}),
        "admin": frozenset({"admin"}),
        "pii": frozenset({"pii"}),
    }
    if kind not in kinds:
        raise InvalidRequest("kind: use all, admin or pii", param="kind")
    try:
        since = _now(gateway) - parse_duration(query["since"]) if "since" in query else None
        limit = int(query.get("limit", "1000"))
    except ValueError:
        raise InvalidRequest("since: a duration such as 7d; limit: a whole number") from None
    if not 1 <= limit <= _MAX_LIMIT:
        raise InvalidRequest(f"limit: from 1 to {_MAX_LIMIT}", param="limit")
    events = await access.audit.events(since, kinds[kind], query.get("tenant"), limit)
    return _json({"object": "list", "data": [e.public() for e in events]})


#: JSON types the policy fields must have: "private_only": "yes" or "rpm": true is a mistake
#: to name, not one to guess at (pydantic would take both)
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "private_only": (bool,),
    "admin": (bool,),
    "rpm": (int,),
    "tpm": (int,),
    "max_parallel": (int,),
}


def _plain_types(body: dict[str, Any]) -> None:
    for name, types in _JSON_TYPES.items():
        value = body.get(name)
        wrong_bool = isinstance(value, bool) and bool not in types
        if value is not None and (wrong_bool or not isinstance(value, types)):
            kind = "true or false" if bool in types else "a whole number"
            raise InvalidRequest(f"Invalid key request: {name}: must be {kind}", param=name)


def _admin(request: web.Request) -> tuple[Gateway, Access]:
    gateway = request.app[GATEWAY]
    require_admin(request, gateway)
    if gateway.access is None:
        error = SpillwayError(
            "Managed keys are off on this gateway: they need the ledger's database "
            "([ledger] enabled) and, for a shared one, [server] secret."
        )
        error.status, error.code = 503, "managed_keys_off"
        raise error
    return gateway, gateway.access


def _ident(request: web.Request) -> str:
    ident = request.match_info["ident"].strip()
    at = ident.find(KEY_SCHEME)
    if at >= 0 and len(ident) - at > PREFIX_LENGTH:  # a key, whatever is around it
        raise InvalidRequest(
            "Name the key by its prefix (its first 15 characters) or key id, not the whole "
            "key: a URL is kept in logs. Revoke this key now if the URL was seen by others."
        )
    return ident


async def _json_body(request: web.Request, gateway: Gateway, optional: bool = False) -> bytes:
    """The body, checked to be one JSON object, sent as ``application/json``: a browser can
    send another type from any page without asking (a CORS "simple" request), so a page
    could otherwise issue keys on a gateway in open mode."""
    raw = await read_within_limits(request, gateway.config.server)
    if optional and not raw.strip():
        return b""
    if request.content_type != "application/json":
        raise InvalidRequest("Send the body as JSON, with 'Content-Type: application/json'.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return raw


async def _take_effect(access: Access) -> None:
    """This replica knows the change before answering; others see it at their next poll."""
    await access.sync.refresh()


def _actor(request: web.Request, gateway: Gateway) -> str:
    if gateway.keys.open:
        return "local"
    return f"key:{principal_of(request).key_id}"


def _now(gateway: Gateway) -> datetime:
    return datetime.fromtimestamp(gateway.clock.wall(), UTC)


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def _json(body: dict[str, Any], status: int = 200, secret: bool = False) -> web.Response:
    """``secret``: the answer holds a key, which no cache on the way may keep."""
    headers = {"Cache-Control": "no-store"} if secret else None
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )
