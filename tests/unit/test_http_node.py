"""``HttpNode``, the boundary where a node's answers become spillway's: against raw sockets
that send what a broken or hostile node sends."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from spillway.config.schema import Timeouts
from spillway.errors import (
    UpstreamBadAnswer,
    UpstreamRejected,
    UpstreamStatusError,
    UpstreamTimeout,
)
from spillway.nodes.http import HttpNode
from spillway.nodes.transport import Transport
from spillway.secrets import Redactor
from spillway.wire.errors import error_body
from tests.fakes.hostile import MiB, endless, fixed, raw_node

JSON = "Content-Type: application/json\r\n"


def node_at(base_url: str, api_key: str | None = None, limit: int = 64 * MiB) -> HttpNode:
    bearer = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    transport = Transport(bearer, secrets=[api_key] if api_key else [])
    return HttpNode("n", base_url, transport, 4, max_response_bytes=limit)


async def test_a_json_answer_is_parsed_once_for_everyone() -> None:
    answer = {"id": "chatcmpl-1", "choices": []}
    async with raw_node(fixed("200 OK", orjson.dumps(answer), JSON)) as raw:
        node = node_at(raw.base_url)
        reply = await node.chat(b"{}", Timeouts())
        assert (reply.status, reply.data, orjson.loads(reply.body)) == (200, answer, answer)
        await node.aclose()


@pytest.mark.parametrize(
    "body",
    [b"<html><body>502 Bad Gateway</body></html>", b'{"id": "chatcmpl-1", "choi', b"[1, 2]"],
    ids=["html", "cut-json", "not-an-object"],
)
async def test_a_200_that_is_not_a_json_object_is_the_nodes_failure(body: bytes) -> None:
    """Before, it went to the client as a 200 application/json; now the node has failed,
    and another may answer."""
    async with raw_node(fixed("200 OK", body, JSON)) as raw:
        node = node_at(raw.base_url)
        with pytest.raises(UpstreamBadAnswer) as caught:
            await node.chat(b"{}", Timeouts())
        await node.aclose()
    assert caught.value.may_fall_back
    assert caught.value.status == 502
    assert caught.value.detail == "HTTP 200 with a body that is not a JSON object"


async def test_an_answer_over_max_response_bytes_says_which_setting_to_raise() -> None:
    head = f"HTTP/1.1 200 OK\r\n{JSON}Content-Length: 10737418240\r\n\r\n"
    async with raw_node(endless(head, total=64 * MiB)) as raw:
        node = node_at(raw.base_url, limit=MiB)
        with pytest.raises(UpstreamBadAnswer) as caught:
            await node.embed(b"{}", Timeouts())
        await node.aclose()
    assert caught.value.may_fall_back
    assert caught.value.detail == (
        f"answer over {MiB} bytes: raise nodes.n.max_response_bytes if answers this large"
        " are expected"
    )
    assert raw.cut_off  # nothing more was read


async def test_every_field_of_a_nodes_rejection_is_scrubbed_and_bounded() -> None:
    """A node that echoes its Authorization header in param and code: before, both went to
    the client (and code to the ledger's error_code) as they came."""
    key = "node-key-REDTEAM-0123456789"  # not shaped like sk-…: only the node's key masks it
    error = {
        "message": f"rejected {key} " + "m" * 5000,
        "type": "invalid_request_error",
        "param": f"Authorization: Bearer {key}",
        "code": key + "c" * 300,
    }
    rejection = orjson.dumps({"error": error})
    not_strings = orjson.dumps({"error": {**error, "param": {"h": key}, "code": [key]}})
    async with raw_node(fixed("400 Bad Request", rejection, JSON)) as raw:
        node = node_at(raw.base_url, api_key=key)
        with pytest.raises(UpstreamRejected) as caught:
            await node.chat(b"{}", Timeouts())
        raw.answer = fixed("422 Unprocessable Entity", not_strings, JSON)
        with pytest.raises(UpstreamRejected) as other:
            await node.chat(b"{}", Timeouts())
        await node.aclose()
    rejected = caught.value
    assert rejected.param == "Authorization: Bearer ***"
    assert rejected.code is not None and len(rejected.code) == 100
    assert rejected.code.startswith("***c")
    assert rejected.message.startswith("rejected *** mmm") and len(rejected.message) == 1000
    assert (other.value.param, other.value.code) == (None, "upstream_error")
    for exc in (rejected, other.value):
        assert key[:12] not in str(error_body(exc, Redactor([])))


@pytest.mark.parametrize("key", ["sk-canary-REDTEAM-0123456789abcdef", "canary-REDTEAM-0123456"])
async def test_a_key_cut_by_the_length_limit_is_still_masked(key: str) -> None:
    """A body that is not JSON is shown only as its first 200 characters. Cut before
    redaction, a key straddling character 200 kept its first half (``sk-canary-REDT``), which
    no longer matched the key: it reached the client's 502, the log and /readyz."""
    body = ("x" * 186 + key + " and more text").encode()
    async with raw_node(fixed("500 Internal Server Error", body)) as raw:
        node = node_at(raw.base_url, api_key=key)
        with pytest.raises(UpstreamStatusError) as caught:
            await node.chat(b"{}", Timeouts())
        await node.aclose()
    assert "canary" not in str(caught.value)
    assert caught.value.detail == "HTTP 500: " + "x" * 186 + "*** and more t"  # 200 characters


async def test_an_answer_still_arriving_at_total_s_is_a_timeout() -> None:
    """The whole answer must be in within total_s: a node that sends its head and part of
    its body, then nothing, is given up on at that deadline (one timer per request)."""
    head = f"HTTP/1.1 200 OK\r\n{JSON}Content-Length: 100000\r\n\r\n"
    async with raw_node(endless(head, total=64 * 1024)) as raw:
        node = node_at(raw.base_url)
        with pytest.raises(UpstreamTimeout) as caught:
            await node.chat(b"{}", Timeouts(total_s=0.3))
        await node.aclose()
    assert caught.value.detail == "no complete answer within 0.3 s"
    assert caught.value.may_fall_back


async def test_a_connect_timeout_names_the_limit_that_applied() -> None:
    """A deadline shorter than connect_s (x-spillway-timeout) bounds the connect: the error
    named connect_s (3 s) though the wait was 0.2 s."""
    head = f"HTTP/1.1 200 OK\r\n{JSON}Content-Length: 100000\r\n\r\n"
    async with raw_node(endless(head, total=64 * 1024)) as raw:
        node = HttpNode("n", raw.base_url, None, 1, max_response_bytes=64 * MiB)
        first = asyncio.create_task(node.chat(b"{}", Timeouts()))  # holds the one connection
        await asyncio.sleep(0.05)
        with pytest.raises(UpstreamTimeout) as caught:
            await node.chat(b"{}", Timeouts(connect_s=3.0, total_s=0.2))
        first.cancel()
        await node.aclose()
    assert caught.value.detail == "no connection within 0.2 s"
