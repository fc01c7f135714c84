"""The start-up warning for an open gateway reachable from the network."""

from __future__ import annotations

import pytest

from spillway.config.load import validate
from spillway.server.app import open_to_network_warning

NODE = {"kind": "private", "base_url": "http://127.0.0.1:9/v1", "models": {"m": "m"}}


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_loopback_without_keys_is_quiet(host: str) -> None:
    config = validate({"server": {"host": host}, "nodes": {"n": NODE}})
    assert open_to_network_warning(config) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "gateway.internal"])
def test_network_listener_without_keys_warns(host: str) -> None:
    config = validate({"server": {"host": host}, "nodes": {"n": NODE}})
    warning = open_to_network_warning(config)
    assert warning is not None and "[[keys]]" in warning and host in warning


def test_keys_silence_the_warning() -> None:
    keys = [{"key": "a-long-key-1", "tenant": "t"}]
    config = validate({"server": {"host": "0.0.0.0"}, "nodes": {"n": NODE}, "keys": keys})
    assert open_to_network_warning(config) is None
