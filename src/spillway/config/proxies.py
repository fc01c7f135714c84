"""Which forward proxy a node is reached through: its own ``proxy``, else the environment's.

Pure: ``config/load.py`` reads ``https_proxy``, ``http_proxy`` and ``no_proxy`` (lower case
first, then upper case, as curl and httpx do) into a ``ProxyEnvironment`` and hands it here;
``with_environment_proxies`` then writes each node's effective proxy into its ``proxy``
setting, once, at load. Nothing later reads the environment again.

``NO_PROXY`` is read as curl reads it (curl's ``--noproxy``, 7.86 and later), plus httpx's
``host:port`` entries: entries separated by commas or spaces; ``*`` alone means no proxy for
anything; an IP address or CIDR range (``10.0.0.0/8``, ``fd00::/8``) matches a node whose
URL names an address in it (no DNS look-up); a name matches itself and every name below it,
with or without a leading ``.`` or ``*.`` (``corp.example`` and ``.corp.example`` both match
``corp.example`` and ``gpu1.corp.example``; httpx's ``.corp.example`` would not match
``corp.example`` itself); ``name:port`` or ``[v6]:port`` matches that port only.
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from pydantic import SecretStr

from spillway.errors import ConfigError

if TYPE_CHECKING:  # the schema imports this module's URL check
    from spillway.config.schema import Config, NodeConfig

#: ``proxy = "none"``: reach this node directly, whatever the environment says.
NO_PROXY = "none"

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ProxyUrl:
    """A parsed ``http://[user:password@]host[:port]`` proxy URL (user and password decoded)."""

    host: str
    port: int
    username: str | None
    password: str | None

    @property
    def basic_credentials(self) -> str | None:
        """``user:password`` in base64 (UTF-8, as curl sends it), for ``Proxy-Authorization:
        Basic``; None without credentials."""
        if self.username is None and self.password is None:
            return None
        pair = f"{self.username or ''}:{self.password or ''}".encode()
        return base64.b64encode(pair).decode("ascii")


def parse_proxy_url(value: str) -> ProxyUrl:
    """Parse a proxy URL; a ``ValueError``'s message never repeats it (it may hold a password).

    Only ``http://`` proxies (CONNECT tunnels carry TLS to https nodes through them); the
    port defaults to 80, as in httpx (curl's default, 1080, is a SOCKS habit).
    """
    text = value.strip()
    parts = urlsplit(text if "://" in text else f"http://{text}")  # curl and httpx allow this
    if parts.scheme.lower() != "http":
        raise ValueError(f"only http:// proxies are supported, not {parts.scheme}://")
    if not parts.hostname:
        raise ValueError("a proxy URL needs a host: http://[user:password@]host:port")
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError("the proxy's port is not a number from 1 to 65535") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("a proxy URL has no path, ?query or #fragment")
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return ProxyUrl(parts.hostname, port, user, password)


def masked_password(url: str) -> str:
    """A proxy URL with its password replaced by ``***``, for ``config check``."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username}:***@{host}").geturl()


@dataclass(frozen=True, slots=True)
class ProxyEnvironment:
    """The proxy variables as ``config/load.py`` found them; ``*_var`` name the variable that
    was used (for error messages)."""

    https: str | None = None
    http: str | None = None
    no_proxy: tuple[str, ...] = ()
    https_var: str = "HTTPS_PROXY"
    http_var: str = "HTTP_PROXY"

    def proxy_for(self, url: str) -> tuple[str, str] | None:
        """``(variable, proxy URL)`` for a node at ``url``, or None to connect directly."""
        parts = urlsplit(url)
        host = (parts.hostname or "").rstrip(".")
        if not host or is_loopback(host):
            return None
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return None
        if bypasses(self.no_proxy, host, port):
            return None
        if parts.scheme == "https":
            return (self.https_var, self.https) if self.https else None
        return (self.http_var, self.http) if self.http else None


def split_no_proxy(value: str) -> tuple[str, ...]:
    """``NO_PROXY``'s entries, lower case, without blanks."""
    return tuple(e.lower().rstrip(".") for e in value.replace(",", " ").split() if e.strip())


def is_loopback(host: str) -> bool:
    """``localhost`` (and names below it, RFC 6761) or a loopback address."""
    host = host.lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    address = _address(host)
    return address is not None and address.is_loopback


def bypasses(no_proxy: tuple[str, ...], host: str, port: int) -> bool:
    """Whether a ``NO_PROXY`` entry covers ``host`` (as in the URL, brackets removed)."""
    host = host.lower().rstrip(".")
    return any(entry == "*" or _matches(entry, host, port) for entry in no_proxy)


def _matches(entry: str, host: str, port: int) -> bool:
    name, wanted_port = _split_port(entry)
    if wanted_port is not None and wanted_port != port:
        return False
    network = _network(name)
    if network is not None:
        address = _address(host)
        return address is not None and address.version == network.version and address in network
    domain = name.removeprefix("*").lstrip(".")
    return bool(domain) and (host == domain or host.endswith("." + domain))


def _split_port(entry: str) -> tuple[str, int | None]:
    """``host:port`` and ``[v6]:port`` into their parts; a bare IPv6 address has no port."""
    if entry.startswith("["):
        inside, _, rest = entry[1:].partition("]")
        if not rest:
            return inside, None
        port = rest.removeprefix(":")
        return inside, int(port) if port.isdigit() else -1
    if entry.count(":") == 1:
        name, _, port = entry.partition(":")
        return name, int(port) if port.isdigit() else -1  # a bad port matches nothing
    return entry, None


def _network(name: str) -> IpNetwork | None:
    try:
        return ipaddress.ip_network(name, strict=False)
    except ValueError:
        return None


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])  # without an IPv6 zone
    except ValueError:
        return None


def with_environment_proxies(config: Config, environment: ProxyEnvironment) -> Config:
    """``config`` with the environment's proxy written into each node that sets none.

    A node that sets ``proxy`` (a URL, or ``"none"``) keeps it. A managed node (no
    ``base_url``: spillway's own child on 127.0.0.1) and a loopback ``base_url`` never take
    the environment's proxy, nor does a node that ``NO_PROXY`` covers.
    """
    nodes = dict(config.nodes)
    for name, node in config.nodes.items():
        chosen = _environment_proxy(node, environment)
        if chosen is None:
            continue
        variable, url = chosen
        try:
            parse_proxy_url(url)
        except ValueError as exc:
            raise ConfigError(variable, f"{exc} (used for node '{name}')") from None
        nodes[name] = node.model_copy(update={"proxy": SecretStr(url.strip())})
    return config.model_copy(update={"nodes": nodes})


def _environment_proxy(node: NodeConfig, environment: ProxyEnvironment) -> tuple[str, str] | None:
    if node.proxy is not None or node.base_url is None:
        return None
    return environment.proxy_for(node.base_url)
