"""TLS to a node: a private CA (``ca_file``), client certificates (mTLS) and ``verify = false``,
against real HTTPS servers with throw-away certificates (trustme)."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop

from spillway.config.load import validate
from spillway.config.schema import Timeouts
from spillway.errors import UpstreamConnectError
from spillway.nodes.http import HttpNode
from spillway.nodes.transport import transport_for
from tests.fakes.gateway import node, running_gateway
from tests.fakes.upstream import FakeUpstream
from tests.faults.test_failover import FAST, ask

pytestmark = pytest.mark.both_loops

CHAT = b'{"model":"private-model","messages":[{"role":"user","content":"hi"}]}'


@dataclass
class Pki:
    """A private CA with a server certificate for 127.0.0.1 and a client certificate, a
    rogue CA's server certificate for the same address, and the PEM files a node names."""

    ca: trustme.CA
    server: trustme.LeafCert
    rogue: trustme.LeafCert
    ca_file: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    client = ca.issue_cert("gateway@spillway.test")
    ca.cert_pem.write_to_path(folder / "ca.pem")
    client.cert_chain_pems[0].write_to_path(folder / "client.pem")
    client.private_key_pem.write_to_path(folder / "client.key")
    return Pki(
        ca,
        ca.issue_cert("127.0.0.1"),
        trustme.CA().issue_cert("127.0.0.1"),
        folder / "ca.pem",
        folder / "client.pem",
        folder / "client.key",
    )


def server_context(cert: trustme.LeafCert, client_ca: trustme.CA | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(context)
    if client_ca is not None:  # mTLS: the server asks for a certificate signed by this CA
        context.verify_mode = ssl.CERT_REQUIRED
        client_ca.configure_trust(context)
    return context


@pytest.fixture
async def https_upstream() -> AsyncIterator[list[FakeUpstream]]:
    """Started fakes, stopped after the test."""
    started: list[FakeUpstream] = []
    yield started
    for fake in started:
        await fake.stop()


async def serve(started: list[FakeUpstream], name: str, tls: ssl.SSLContext) -> FakeUpstream:
    fake = await FakeUpstream(name, tls=tls).start()
    started.append(fake)
    return fake


def https_node(base_url: str, **settings: Any) -> HttpNode:
    raw = {"kind": "private", "base_url": base_url, "models": {"m": "m"}, **settings}
    spec = validate({"nodes": {"n": raw}}).nodes["n"]
    return HttpNode("n", base_url, transport_for(spec, https=True), 4, max_response_bytes=2**20)


async def chat(node_: HttpNode) -> int:
    try:
        return (await node_.chat(CHAT, Timeouts(connect_s=2, total_s=5))).status
    finally:
        await node_.aclose()


async def test_ca_file_trusts_a_private_ca(pki: Pki, https_upstream: list[FakeUpstream]) -> None:
    fake = await serve(https_upstream, "n", server_context(pki.server))
    assert await chat(https_node(fake.base_url, ca_file=str(pki.ca_file))) == 200
    assert fake.calls == 1


async def test_without_ca_file_the_private_ca_is_not_trusted(
    pki: Pki, https_upstream: list[FakeUpstream]
) -> None:
    fake = await serve(https_upstream, "n", server_context(pki.server))
    with pytest.raises(UpstreamConnectError) as caught:
        await chat(https_node(fake.base_url))
    assert "TLS: unable to get local issuer certificate" in caught.value.message
    assert fake.calls == 0


async def test_a_certificate_from_another_ca_is_refused(
    pki: Pki, https_upstream: list[FakeUpstream]
) -> None:
    """ca_file replaces the system's CAs (as curl's --cacert): only it may sign."""
    fake = await serve(https_upstream, "n", server_context(pki.rogue))
    with pytest.raises(UpstreamConnectError) as caught:
        await chat(https_node(fake.base_url, ca_file=str(pki.ca_file)))
    assert caught.value.delivered is False  # another node may take it freely
    assert "cannot connect (TLS: " in caught.value.message
    assert "127.0.0.1" not in caught.value.message
    assert fake.calls == 0


async def test_a_certificate_for_another_host_is_refused_without_naming_the_host(
    pki: Pki, https_upstream: list[FakeUpstream]
) -> None:
    fake = await serve(https_upstream, "n", server_context(pki.ca.issue_cert("other.test")))
    with pytest.raises(UpstreamConnectError) as caught:
        await chat(https_node(fake.base_url, ca_file=str(pki.ca_file)))
    assert "not valid for the node's host name" in caught.value.message
    assert "127.0.0.1" not in caught.value.message


async def test_verify_false_accepts_any_certificate(
    pki: Pki, https_upstream: list[FakeUpstream]
) -> None:
    fake = await serve(https_upstream, "n", server_context(pki.rogue))
    assert await chat(https_node(fake.base_url, verify=False)) == 200


async def test_a_client_certificate_answers_a_node_that_requires_one(
    pki: Pki, https_upstream: list[FakeUpstream]
) -> None:
    fake = await serve(https_upstream, "n", server_context(pki.server, client_ca=pki.ca))
    settings = {"client_cert": str(pki.client_cert), "client_key": str(pki.client_key)}
    assert await chat(https_node(fake.base_url, ca_file=str(pki.ca_file), **settings)) == 200
    assert fake.calls == 1


@pytest.fixture
def mtls_server(pki: Pki) -> Iterator[tuple[str, list[bytes]]]:
    """A blocking TLS server in a thread that requires a client certificate: it sends the TLS
    alert before closing (an asyncio server drops it), as nginx or OpenSSL's s_server do."""
    context = server_context(pki.server, client_ca=pki.ca)
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def serve_forever() -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(sock, server_side=True) as tls:
                    seen.append(tls.recv(65536))
            except (OSError, ssl.SSLError):
                sock.close()

    thread = threading.Thread(target=serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{listener.getsockname()[1]}/v1", seen
    listener.close()


async def test_a_node_that_requires_a_client_certificate_refuses_one_without(
    pki: Pki, mtls_server: tuple[str, list[bytes]]
) -> None:
    base_url, seen = mtls_server
    with pytest.raises(UpstreamConnectError) as caught:
        await chat(https_node(base_url, ca_file=str(pki.ca_file)))
    assert seen == []  # the node's TLS layer refused us: no request reached the node
    if isinstance(asyncio.get_running_loop(), uvloop.Loop):  # spillway serve's loop
        # TLS 1.3 refuses a client after its handshake, so the alert follows our write;
        # uvloop reports it, and the attempt counts as never delivered.
        assert "TLS: TLSV13_ALERT_CERTIFICATE_REQUIRED" in caught.value.message
        assert caught.value.delivered is False
    else:  # asyncio's SSL transport reports the alert, or at times only the close after it
        message = caught.value.message
        assert "TLS: TLSV13_ALERT_CERTIFICATE_REQUIRED" in message or "closed by" in message


async def test_a_node_with_a_bad_certificate_falls_back_and_verify_false_is_warned(
    pki: Pki, https_upstream: list[FakeUpstream], caplog: pytest.LogCaptureFixture
) -> None:
    bad = await serve(https_upstream, "bad", server_context(pki.rogue))
    good = await serve(https_upstream, "good", server_context(pki.server))
    lax = await serve(https_upstream, "lax", server_context(pki.rogue))
    config = {
        "timeouts": FAST,
        "nodes": {
            "bad": node("private", bad.base_url, ca_file=str(pki.ca_file)),
            "good": node("cloud", good.base_url, ca_file=str(pki.ca_file)),
            "lax": {**node("cloud", lax.base_url, verify=False), "models": {"other": "x"}},
        },
    }
    with caplog.at_level(logging.WARNING, logger="spillway"):
        async with running_gateway(config) as gw:
            result = await ask(gw.client(), stream=False)
    assert (result.node, bad.calls, good.calls) == ("good", 0, 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("node lax: verify = false" in message for message in warnings)
    assert not any("node bad" in m or "node good" in m for m in warnings if "verify" in m)
