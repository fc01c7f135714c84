"""CORS with a real browser: headless Chromium, driven by Selenium, loads a page from one
origin and calls spillway with ``fetch`` from it, as a browser client would. The page of a
listed origin reads answers, error bodies and exposed headers; the same page from another
origin is refused by the browser itself."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp import web
from selenium import webdriver

from spillway.nodes.managed import free_loopback_port
from tests.fakes.gateway import RunningGateway, node, running_gateway
from tests.fakes.upstream import FakeUpstream

FETCH = """
const [url, key, done] = arguments;
fetch(url, {method: "POST", headers: {"Authorization": "Bearer " + key,
  "Content-Type": "application/json"},
  body: JSON.stringify({model: "m", messages: [{role: "user", content: "hi"}]})})
  .then(async r => done({status: r.status, id: r.headers.get("x-request-id"),
                         body: await r.text()}))
  .catch(e => done({error: String(e)}));
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.fail(
            "chromium and chromedriver are needed (apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=driver_path)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_script_timeout(10)
    yield driver
    driver.quit()


async def serve_page(port: int) -> web.AppRunner:
    """A page on http://127.0.0.1:<port>: the origin a browser client runs at."""

    async def page(_: web.Request) -> web.Response:
        return web.Response(text="<html><body>app</body></html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


@pytest.fixture
async def setup() -> AsyncIterator[tuple[RunningGateway, int, int]]:
    listed, other = free_loopback_port(), free_loopback_port()
    up = await FakeUpstream("a").start()
    pages = [await serve_page(listed), await serve_page(other)]
    config = {
        "server": {"cors": {"allow_origins": [f"http://127.0.0.1:{listed}"]}},
        "nodes": {"a": node("private", up.base_url)},
        "keys": [{"key": "key-browser-0", "tenant": "web"}],
        "cache": {"mode": "off"},
    }
    async with running_gateway(config) as gw:
        yield gw, listed, other
    for page in pages:
        await page.cleanup()
    await up.stop()


async def call_from(browser: webdriver.Chrome, page: int, url: str, key: str) -> dict[str, Any]:
    """Open the page at ``page`` and fetch ``url`` from it (in a thread: Selenium blocks)."""

    def run() -> dict[str, Any]:
        browser.get(f"http://127.0.0.1:{page}/")
        result: dict[str, Any] = browser.execute_async_script(FETCH, url, key)
        return result

    return await asyncio.to_thread(run)


async def test_a_page_of_a_listed_origin_reads_answers_errors_and_headers(browser, setup) -> None:
    gw, listed, _ = setup
    url = f"{gw.base_url}/chat/completions"
    answer = await call_from(browser, listed, url, "key-browser-0")
    assert answer["status"] == 200 and '"choices"' in answer["body"]
    assert answer["id"]  # x-request-id is exposed to the page
    refused = await call_from(browser, listed, url, "wrong-key-123")
    assert refused["status"] == 401 and "invalid_api_key" in refused["body"]


async def test_the_browser_refuses_a_page_of_another_origin(browser, setup) -> None:
    gw, _, other = setup
    result = await call_from(browser, other, f"{gw.base_url}/chat/completions", "key-browser-0")
    assert "error" in result and "Failed to fetch" in result["error"]
