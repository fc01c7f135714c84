"""GET /v1/models, /healthz and /readyz."""

from __future__ import annotations

import time

import orjson
from aiohttp import web

from spillway.errors import ModelNotFound
from spillway.server.middleware import principal_of
from spillway.server.state import GATEWAY

_STARTED = int(time.time())


async def list_models(request: web.Request) -> web.Response:
    principal = principal_of(request)
    models = request.app[GATEWAY].router.models()
    data = [_model(m) for m in models if principal.may_use(m)]
    return web.Response(
        body=orjson.dumps({"object": "list", "data": data}), content_type="application/json"
    )


async def get_model(request: web.Request) -> web.Response:
    model = request.match_info["model"]
    if not principal_of(request).may_use(model):
        raise ModelNotFound.named(model)
    request.app[GATEWAY].router.serving(model)  # 404 in the OpenAI envelope if unknown
    return web.Response(body=orjson.dumps(_model(model)), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    """The process is alive and its event loop answers; says nothing about the nodes."""
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


async def readyz(request: web.Request) -> web.Response:
    """200 only when every public model has at least one node answering right now."""
    gateway = request.app[GATEWAY]
    ready, body = await gateway.health.readiness()
    body["cache"] = gateway.pipeline.cache.describe()
    return web.Response(
        body=orjson.dumps(body), status=200 if ready else 503, content_type="application/json"
    )


def _model(name: str) -> dict[str, object]:
    return {"id": name, "object": "model", "created": _STARTED, "owned_by": "spillway"}
