"""A node's pool outlives an event loop (a test run, a restart of the loop in a worker): the
next loop's requests work, as they did before the pool kept its loop."""

from __future__ import annotations

import asyncio

from aiohttp import web

from spillway.nodes.managed import free_loopback_port
from spillway.nodes.pool import Pool


async def _serve(port: int) -> web.AppRunner:
    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/v1/x", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def test_a_pool_serves_a_second_event_loop_after_the_first_closed() -> None:
    port = free_loopback_port()
    pool = Pool(f"http://127.0.0.1:{port}/v1", headers={}, max_connections=2, max_body_bytes=1024)

    async def once() -> int:
        runner = await _serve(port)  # each loop's own server, on the same port
        loop = asyncio.get_running_loop()
        response = await pool.request(
            "GET", "/x", None, connect_timeout_s=2, deadline=loop.time() + 2
        )
        await response.read()
        await runner.cleanup()
        return response.status

    assert asyncio.run(once()) == 200
    assert asyncio.run(once()) == 200
