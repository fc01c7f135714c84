"""How spillway reaches one node: its proxy, its TLS context and the headers on every request.

``transport_for`` builds a ``Transport`` once per node from its configuration, and every pool
that talks to the node uses it: the requests' pool and the metrics scrape's. The SSL context
is made once per node too (loading a CA bundle takes milliseconds); nothing here runs per
request.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from spillway.config.proxies import NO_PROXY, parse_proxy_url
from spillway.config.schema import NodeConfig
from spillway.secrets import node_secrets


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP forward proxy: CONNECT tunnels for https:// nodes, absolute-form requests for
    http:// ones. Errors name neither its address nor its credentials."""

    host: str
    port: int
    #: the ``Proxy-Authorization`` value ("Basic …"), or None
    authorization: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """``ca_file`` replaces the system's CAs (as curl's ``--cacert``); ``verify`` False checks
    nothing; ``client_cert`` with ``client_key`` answers a node that asks for client TLS."""

    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    verify: bool = True


class Transport:
    """Proxy, TLS and fixed headers for one node; ``secrets`` are what its errors must never
    show (its key, its headers' values, its proxy's password)."""

    __slots__ = ("_context", "headers", "proxy", "secrets", "tls")

    def __init__(
        self,
        headers: Mapping[str, str] | None = None,
        *,
        proxy: Proxy | None = None,
        tls: TlsSettings | None = None,
        secrets: Sequence[str] = (),
    ) -> None:
        self.headers: Mapping[str, str] = dict(headers or {})
        self.proxy = proxy
        self.tls = tls or TlsSettings()
        self.secrets = tuple(secrets)
        self._context: ssl.SSLContext | None = None

    def ssl_context(self) -> ssl.SSLContext:
        """The node's one SSL context, made on first use. ``ValueError`` if a file will not
        load (the message names the setting, never a secret)."""
        if self._context is None:
            self._context = _context(self.tls)
        return self._context


def transport_for(spec: NodeConfig, *, https: bool) -> Transport:
    """The node's transport; ``https``: it is reached over TLS somewhere (its base_url or its
    metrics), so the SSL context is made now, and a bad file stops the start."""
    transport = Transport(
        _headers(spec), proxy=_proxy(spec), tls=_tls(spec), secrets=node_secrets(spec)
    )
    if https:
        transport.ssl_context()
    return transport


def _headers(spec: NodeConfig) -> dict[str, str]:
    headers = {name: value.get_secret_value() for name, value in spec.headers.items()}
    key = spec.api_key.get_secret_value() if spec.api_key is not None else ""
    if key:  # an empty key (``${KEY:-}`` left unset) sends no header, as before
        bearer = spec.auth_header.lower() == "authorization"
        headers[spec.auth_header] = f"Bearer {key}" if bearer else key
    return headers


def _proxy(spec: NodeConfig) -> Proxy | None:
    url = spec.proxy.get_secret_value() if spec.proxy is not None else NO_PROXY
    if url == NO_PROXY:
        return None
    parsed = parse_proxy_url(url)  # checked at load: this cannot fail here
    basic = parsed.basic_credentials
    return Proxy(parsed.host, parsed.port, f"Basic {basic}" if basic else None)


def _tls(spec: NodeConfig) -> TlsSettings:
    return TlsSettings(spec.ca_file, spec.client_cert, spec.client_key, spec.verify)


def _context(tls: TlsSettings) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=tls.ca_file)  # only it, as curl --cacert
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"ca_file: cannot load it as PEM certificates ({_why(exc)})") from None
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.client_cert is not None:
        try:
            context.load_cert_chain(tls.client_cert, tls.client_key, password=_no_password)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"client_cert, client_key: cannot load them ({_why(exc)}); the key must be "
                "unencrypted PEM and belong to the certificate"
            ) from None
    return context


def _no_password() -> bytes:
    """An encrypted key would otherwise make OpenSSL prompt on the terminal at start."""
    raise ssl.SSLError("the key is encrypted")


def _why(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None)
    return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
