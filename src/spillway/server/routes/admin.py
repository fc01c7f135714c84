"""GET /admin/nodes: what the router knows and decides, per node and per model."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from spillway.errors import PermissionDenied
from spillway.routing.router import NodeHandle, Router
from spillway.server.middleware import principal_of
from spillway.server.state import GATEWAY, Gateway


async def nodes(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    require_admin(request, gateway)
    return web.Response(body=orjson.dumps(snapshot(gateway)), content_type="application/json")


def snapshot(gateway: Gateway) -> dict[str, Any]:
    router = gateway.router
    now = gateway.clock.monotonic()
    return {
        "nodes": [_node(router, h, now, gateway.clock.wall()) for h in router.handles],
        "models": {
            model: {
                "requests": c.requests,
                "spilled": c.spilled,
                "spill_share": _share(c.spilled, c.requests),
                "waiting": gateway.pipeline.dispatcher.queues[model].waiting,
            }
            for model, c in router.counters.items()
        },
        "retry_budget": _plain(gateway.pipeline.dispatcher.budget.stats()),
    }


def _node(router: Router, handle: NodeHandle, now: float, wall: float) -> dict[str, Any]:
    stats = handle.stats
    breaker = router.board.stats(handle.name)
    engine = stats.engine
    requests = sum(router.counters[m].requests for m in handle.models)
    spilled = sum(router.counters[m].spilled for m in handle.models)
    return {
        "name": handle.name,
        "kind": handle.kind,
        "models": sorted(handle.models),
        "breaker": str(breaker.state),
        "breaker_open_remaining_s": round(breaker.open_remaining_s, 3),
        "consecutive_failures": breaker.consecutive_failures,
        "in_flight": handle.in_flight,
        "max_concurrency": handle.max_concurrency,
        "weight": handle.weight,
        "hot": stats.hot,
        "load_signal": handle.load_signal,
        "signal": None if engine is None else _plain(engine),
        "signal_age_s": None if stats.engine_at is None else round(now - stats.engine_at, 3),
        "ttft_avg_s": None if stats.ttft_ewma_s is None else round(stats.ttft_ewma_s, 4),
        "attempts": stats.attempts,
        "successes": stats.successes,
        "failures": stats.failures,
        "spill_share": _share(spilled, requests),
        "managed": None if handle.process is None else handle.process.status().describe(wall),
    }


def require_admin(request: web.Request, gateway: Gateway) -> None:
    if gateway.keys.open:
        # No keys configured: admin data only for callers on this machine.
        if request.remote not in ("127.0.0.1", "::1"):
            raise PermissionDenied(
                "Admin endpoints need an admin key; configure [[keys]] or run "
                "`spillway keys create --admin`."
            )
        return
    if not principal_of(request).admin:
        raise PermissionDenied(
            "This key is not an admin key (admin = true in [[keys]], or a key made with "
            "`spillway keys create --admin`)."
        )


def _share(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def _plain(value: Any) -> dict[str, Any]:
    fields = getattr(value, "__dataclass_fields__", {})
    return {name: _round(getattr(value, name)) for name in fields}


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value
