"""CORS at the HTTP level (``[server.cors]``): preflights, grants on answers, errors and
streams, and none for other origins. ``tests/e2e/test_cors_browser.py`` checks the same with a
real browser."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.fakes.gateway import RunningGateway, node, running_gateway
from tests.fakes.upstream import FakeUpstream

APP = "https://app.example.com"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def up() -> AsyncIterator[FakeUpstream]:
    fake = await FakeUpstream("a").start()
    yield fake
    await fake.stop()


def config(up: FakeUpstream, origins: list[str]) -> dict[str, object]:
    return {
        "server": {"cors": {"allow_origins": origins}},
        "nodes": {"a": node("private", up.base_url)},
        "keys": [{"key": "key-browser-0", "tenant": "web"}],
        "cache": {"mode": "off"},
    }


@pytest.fixture
async def gw(up: FakeUpstream) -> AsyncIterator[RunningGateway]:
    async with running_gateway(config(up, [APP, "http://localhost:5173"])) as running:
        yield running


async def test_a_listed_origin_gets_its_preflight_answered_without_a_key(gw) -> None:
    async with httpx.AsyncClient(base_url=gw.url) as http:
        answer = await http.options(
            "/v1/chat/completions",
            headers={
                "Origin": APP,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type, x-stainless-os, x-a",
            },
        )
    assert answer.status_code == 204
    assert answer.headers["access-control-allow-origin"] == APP
    assert "POST" in answer.headers["access-control-allow-methods"]
    allowed = answer.headers["access-control-allow-headers"].split(", ")
    assert allowed == ["authorization", "content-type", "x-stainless-os"]
    assert "Origin" in answer.headers["vary"]
    assert "access-control-allow-credentials" not in answer.headers


async def test_another_origin_gets_no_grant(gw) -> None:
    async with httpx.AsyncClient(base_url=gw.url) as http:
        preflight = await http.options(
            "/v1/chat/completions",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        answer = await http.post(
            "/v1/chat/completions",
            json=BODY,
            headers={"Origin": "https://evil.example", "Authorization": "Bearer key-browser-0"},
        )
    assert "access-control-allow-origin" not in preflight.headers
    assert answer.status_code == 200  # the server answers; the browser keeps it from the page
    assert "access-control-allow-origin" not in answer.headers
    assert "Origin" in answer.headers["vary"]


async def test_answers_errors_and_streams_carry_the_grant(gw) -> None:
    headers = {"Origin": APP, "Authorization": "Bearer key-browser-0"}
    async with httpx.AsyncClient(base_url=gw.url) as http:
        answer = await http.post("/v1/chat/completions", json=BODY, headers=headers)
        refused = await http.post(
            "/v1/chat/completions", json=BODY, headers={**headers, "Authorization": "Bearer x"}
        )
        async with http.stream(
            "POST", "/v1/chat/completions", json={**BODY, "stream": True}, headers=headers
        ) as stream:
            stream_headers = stream.headers
            await stream.aread()
    for response_headers in (answer.headers, refused.headers, stream_headers):
        assert response_headers["access-control-allow-origin"] == APP
        assert "x-request-id" in response_headers["access-control-expose-headers"]
        assert response_headers["access-control-allow-origin"] != "*"
    assert refused.status_code == 401


async def test_without_origins_cors_is_off(up: FakeUpstream) -> None:
    async with running_gateway(config(up, [])) as gw, httpx.AsyncClient(base_url=gw.url) as http:
        preflight = await http.options(
            "/v1/chat/completions",
            headers={"Origin": APP, "Access-Control-Request-Method": "POST"},
        )
        answer = await http.post(
            "/v1/chat/completions",
            json=BODY,
            headers={"Origin": APP, "Authorization": "Bearer key-browser-0"},
        )
    assert preflight.status_code == 401  # no preflight handling: an ordinary keyless request
    assert "access-control-allow-origin" not in preflight.headers
    assert "access-control-allow-origin" not in answer.headers
    assert "vary" not in answer.headers
