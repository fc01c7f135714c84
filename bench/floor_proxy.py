"""The floor for a Python LLM proxy: the least an aiohttp gateway can do per request.

An aiohttp.web server on uvloop with the access log off, and one pooled aiohttp.ClientSession.
For each chat completion it reads the body, parses it (to find the model and whether it is a
stream), forwards the bytes unchanged to that model's upstream, and returns the answer: whole for
ordinary requests, chunk by chunk as it arrives for streams. No auth, no routing policy, no
accounting. ``bench/run`` measures spillway's added latency against this one's.

    python bench/floor_proxy.py --port 9000 --route bench=http://127.0.0.1:8080/v1
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import orjson
import uvloop
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

ROUTES: web.AppKey[dict[str, str]] = web.AppKey("routes", dict)
SESSION: web.AppKey[ClientSession] = web.AppKey("session", ClientSession)


def _error(status: int, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error"}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    try:
        payload = orjson.loads(body)
        model = payload["model"]
        stream = payload.get("stream") is True
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return _error(400, "body must be a JSON object with a model")
    upstream = request.app[ROUTES].get(model)
    if upstream is None:
        return _error(404, f"no upstream for model {model!r}")
    session = request.app[SESSION]
    headers = {"Content-Type": "application/json"}
    async with session.post(f"{upstream}/chat/completions", data=body, headers=headers) as up:
        if not stream:
            return web.Response(
                status=up.status, body=await up.read(), content_type=up.content_type
            )
        response = web.StreamResponse(
            status=up.status,
            headers={"Content-Type": up.headers.get("Content-Type", "text/event-stream")},
        )
        await response.prepare(request)
        async for chunk in up.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def models(request: web.Request) -> web.Response:
    upstream = next(iter(request.app[ROUTES].values()))
    async with request.app[SESSION].get(f"{upstream}/models") as up:
        return web.Response(status=up.status, body=await up.read(), content_type=up.content_type)


async def _session(app: web.Application) -> AsyncIterator[None]:
    connector = TCPConnector(limit=0, keepalive_timeout=60)
    async with ClientSession(connector=connector, timeout=ClientTimeout(total=300)) as session:
        app[SESSION] = session
        yield


def build_app(routes: dict[str, str]) -> web.Application:
    app = web.Application()
    app[ROUTES] = routes
    app.cleanup_ctx.append(_session)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--route",
        action="append",
        required=True,
        metavar="MODEL=BASE_URL",
        help="send MODEL to BASE_URL (an OpenAI base URL ending in /v1); repeatable",
    )
    args = parser.parse_args()
    routes = dict(item.split("=", 1) for item in args.route)
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    web.run_app(
        build_app(routes), host=args.host, port=args.port, access_log=None, print=None, loop=loop
    )


if __name__ == "__main__":
    main()
