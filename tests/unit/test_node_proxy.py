"""Nodes behind a real forward proxy: Debian's tinyproxy, with BasicAuth, started per test.

https:// nodes go through a CONNECT tunnel (TLS to the node inside it, SNI = the node's
name), http:// nodes with absolute-form requests; NO_PROXY sends a node around the proxy;
a wrong password is a clear error; the password shows nowhere.
"""

from __future__ import annotations

import base64
import logging
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import ClientSession

from spillway.config.load import load_config, validate
from spillway.config.schema import NodeConfig, Timeouts
from spillway.errors import UpstreamConnectError
from spillway.nodes.http import HttpNode
from spillway.nodes.transport import transport_for
from tests.fakes.gateway import node, running_gateway
from tests.fakes.upstream import FakeUpstream
from tests.faults.test_failover import FAST, ask

TINYPROXY = shutil.which("tinyproxy")
pytestmark = pytest.mark.skipif(
    TINYPROXY is None, reason="tinyproxy is not installed (apt-get install -y tinyproxy)"
)

USER = "gateway"
PASSWORD = "s3cret-Pr0xy_pw42"  # tinyproxy's BasicAuth takes letters, digits, - and _ only
CHAT = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Tinyproxy:
    port: int
    log: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    def url(self, password: str = PASSWORD) -> str:
        return f"http://{USER}:{password}@127.0.0.1:{self.port}"

    def requests(self) -> list[str]:
        """The request lines tinyproxy received ("CONNECT host:port HTTP/1.1", …)."""
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return [line.split("): ", 1)[1] for line in lines if "Request (file descriptor" in line]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=5)


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[Callable[..., Tinyproxy]]:
    """Starts tinyproxy on a free port, CONNECT allowed to the given ports only."""
    started: list[Tinyproxy] = []

    def start(*connect_ports: int) -> Tinyproxy:
        assert TINYPROXY is not None
        port, log = free_port(), tmp_path / f"tinyproxy-{len(started)}.log"
        conf = tmp_path / f"tinyproxy-{len(started)}.conf"
        lines = [
            f"Port {port}",
            "Listen 127.0.0.1",
            "Timeout 30",
            f'LogFile "{log}"',
            "LogLevel Connect",
            "MaxClients 50",
            "Allow 127.0.0.1",
            f"BasicAuth {USER} {PASSWORD}",
            *(f"ConnectPort {p}" for p in connect_ports or (443,)),
        ]
        conf.write_text("\n".join(lines) + "\n")
        process = subprocess.Popen(
            [TINYPROXY, "-d", "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        proxy = Tinyproxy(port, log, process)
        started.append(proxy)
        _wait_for_port(port)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def _wait_for_port(port: int) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise AssertionError("tinyproxy did not start listening")


@dataclass
class Tls:
    ca_file: Path
    server: ssl.SSLContext
    names: list[str | None]  # the SNI server names the node saw


@pytest.fixture
def tls(tmp_path: Path) -> Tls:
    """An HTTPS context for a node called "localhost", recording the SNI it is asked for."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(server)
    names: list[str | None] = []
    server.sni_callback = lambda _sock, name, _ctx: names.append(name)  # type: ignore[assignment,misc,return-value]
    return Tls(tmp_path / "ca.pem", server, names)


@pytest.fixture
async def fakes() -> AsyncIterator[list[FakeUpstream]]:
    started: list[FakeUpstream] = []
    yield started
    for fake in started:
        await fake.stop()


async def start(fakes: list[FakeUpstream], name: str, **options: Any) -> FakeUpstream:
    fake = await FakeUpstream(name, **options).start()
    fakes.append(fake)
    return fake


def spec_for(base_url: str, **settings: Any) -> NodeConfig:
    raw = {"kind": "cloud", "base_url": base_url, "models": {"m": "m"}, **settings}
    return validate({"nodes": {"n": raw}}).nodes["n"]


async def chat(spec: NodeConfig) -> int:
    assert spec.base_url is not None
    https = spec.base_url.startswith("https://")
    transport = transport_for(spec, https=https)
    client = HttpNode("n", spec.base_url, transport, 4, max_response_bytes=2**20)
    try:
        return (await client.chat(CHAT, Timeouts(connect_s=3, total_s=5))).status
    finally:
        await client.aclose()


async def test_an_https_node_is_reached_through_a_connect_tunnel(
    tinyproxy: Callable[..., Tinyproxy], tls: Tls, fakes: list[FakeUpstream]
) -> None:
    fake = await start(fakes, "n", tls=tls.server, host="localhost")
    proxy = tinyproxy(fake.port)
    spec = spec_for(fake.base_url, proxy=proxy.url(), ca_file=str(tls.ca_file))
    assert await chat(spec) == 200
    assert proxy.requests() == [f"CONNECT localhost:{fake.port} HTTP/1.1"]
    assert tls.names == ["localhost"]  # TLS inside the tunnel is to the node, by its name
    assert fake.calls == 1
    assert "Proxy-Authorization" not in fake.received[0].headers  # for the proxy only


async def test_an_http_node_is_reached_with_absolute_form_requests(
    tinyproxy: Callable[..., Tinyproxy], fakes: list[FakeUpstream]
) -> None:
    fake = await start(fakes, "n")
    proxy = tinyproxy()
    assert await chat(spec_for(fake.base_url, proxy=proxy.url())) == 200
    target = f"http://127.0.0.1:{fake.port}/v1/chat/completions"
    assert proxy.requests() == [f"POST {target} HTTP/1.1"]
    assert fake.calls == 1


async def test_a_refusing_proxy_is_a_clear_error_without_the_password(
    tinyproxy: Callable[..., Tinyproxy], tls: Tls, fakes: list[FakeUpstream]
) -> None:
    """tinyproxy answers a wrong password with 401 and none with 407; either way the error
    names the proxy's status, and the node saw nothing."""
    secure = await start(fakes, "s", tls=tls.server, host="localhost")
    plain = await start(fakes, "p")
    proxy = tinyproxy(secure.port)
    wrong = "wrong-Pa55word_x"
    spec = spec_for(secure.base_url, proxy=proxy.url(wrong), ca_file=str(tls.ca_file))
    with pytest.raises(UpstreamConnectError) as refused:
        await chat(spec)
    assert refused.value.message == (
        "node 'n': cannot connect (proxy refused CONNECT: HTTP 401 Unauthorized)"
    )
    # http:// through a proxy that wants credentials and got none: its 407 is not the node's
    # answer. (A GET: tinyproxy answers without reading a request's body, and the reset
    # that closing on an unread body causes can beat its answer to the client.)
    anonymous = HttpNode(
        "n", plain.base_url, transport_for(spec_for(plain.base_url, proxy=f"http://127.0.0.1:"
                                                     f"{proxy.port}"), https=False),
        4, max_response_bytes=2**20,
    )  # fmt: skip
    with pytest.raises(UpstreamConnectError) as anonymous_refused:
        await anonymous.probe(3.0)
    await anonymous.aclose()
    assert anonymous_refused.value.message == (
        "node 'n': proxy refused the request: HTTP 407 Proxy Authentication Required"
    )
    assert (refused.value.delivered, anonymous_refused.value.delivered) == (False, False)
    assert (secure.calls, plain.calls) == (0, 0)
    assert wrong not in refused.value.message and PASSWORD not in refused.value.message


def non_loopback_ipv4() -> str | None:
    """This machine's address on its default route, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.254.254.254", 1))
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if address.startswith("127.") else address


async def test_no_proxy_sends_a_node_around_the_environments_proxy(
    tinyproxy: Callable[..., Tinyproxy], fakes: list[FakeUpstream], tmp_path: Path
) -> None:
    """From the environment, as at start: HTTP_PROXY for http:// nodes, NO_PROXY by address
    and by name (loopback nodes are never proxied from the environment, so both nodes listen
    on this machine's own network address)."""
    address = non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to serve a node on")
    direct = await start(fakes, "direct", host=address)
    proxied = await start(fakes, "proxied", host=address)
    proxy = tinyproxy()
    toml = tmp_path / "spillway.toml"
    toml.write_text(
        f'[nodes.direct]\nkind = "cloud"\nbase_url = "{direct.base_url}"\nmodels = {{m = "m"}}\n'
        f'[nodes.proxied]\nkind = "cloud"\nbase_url = "{proxied.base_url}"\n'
        'models = { m = "m" }\n'
    )
    env = {"HTTP_PROXY": proxy.url(), "NO_PROXY": f"example.invalid, {address}:{direct.port}"}
    config = load_config(toml, env)
    assert config.nodes["direct"].proxy is None
    for name in ("direct", "proxied"):
        assert await chat(config.nodes[name]) == 200
    assert proxy.requests() == [f"POST {proxied.base_url}/chat/completions HTTP/1.1"]
    assert (direct.calls, proxied.calls) == (1, 1)


async def test_the_proxy_password_shows_in_no_log_error_or_endpoint(
    tinyproxy: Callable[..., Tinyproxy],
    tls: Tls,
    fakes: list[FakeUpstream],
    caplog: pytest.LogCaptureFixture,
) -> None:
    locked = await start(fakes, "locked", tls=tls.server, host="localhost")
    cloud = await start(fakes, "cloud", tls=tls.server, host="localhost")
    proxy = tinyproxy(locked.port, cloud.port)
    wrong = "wrong-Pa55word_x"
    config = {
        "timeouts": FAST,
        "nodes": {
            "locked": node("private", locked.base_url, proxy=proxy.url(wrong),
                           ca_file=str(tls.ca_file)),
            "cloud": node("cloud", cloud.base_url, proxy=proxy.url(), ca_file=str(tls.ca_file)),
            "only-locked": {**node("private", locked.base_url, proxy=proxy.url(wrong),
                                   ca_file=str(tls.ca_file)), "models": {"locked-only": "x"}},
        },
    }  # fmt: skip
    bodies: list[str] = []
    with caplog.at_level(logging.DEBUG):
        async with running_gateway(config) as gw:
            assert (await ask(gw.client(), stream=True)).node == "cloud"  # the locked one failed
            async with ClientSession() as http:
                payload = {"model": "locked-only", "messages": [{"role": "user", "content": "x"}]}
                async with http.post(f"{gw.base_url}/chat/completions", json=payload) as resp:
                    assert resp.status == 502
                    bodies.append(await resp.text())
                for path in ("/readyz", "/admin/nodes"):
                    async with http.get(gw.url + path) as resp:
                        bodies.append(await resp.text())
    assert "proxy refused CONNECT: HTTP 401 Unauthorized" in bodies[0]
    assert len(proxy.requests()) >= 3
    shown = "\n".join([*bodies, caplog.text, *(r.getMessage() for r in caplog.records)])
    for secret in (PASSWORD, wrong):
        encoded = base64.b64encode(f"{USER}:{secret}".encode()).decode()
        assert secret not in shown and encoded not in shown
