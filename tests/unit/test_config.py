from pathlib import Path
from typing import Any

import pytest

from spillway.config.defaults import embedded_config
from spillway.config.load import environ, interpolate, load_config, validate
from spillway.config.schema import Config, Timeouts
from spillway.errors import ConfigError

FULL = """
[server]
port = 8100

[timeouts]
connect_s = 2.0
first_token_s = 20.0

[nodes.ascend-1]
kind = "private"
base_url = "http://10.0.0.5:8000/v1/"
models = { default = "qwen2.5-7b" }
max_concurrency = 8
weight = 2.0
load_signal = "mindie"
timeouts = { first_token_s = 90.0, idle_s = 45.0 }

[nodes.cloud]
kind = "cloud"
base_url = "${CLOUD_URL:-https://api.example.com/v1}"
api_key = "${CLOUD_KEY}"
models = { default = "deepseek-chat" }

[[keys]]
key = "${TEAM_A_KEY}"
tenant = "team-a"
private_only = true
"""
ENV = {"CLOUD_KEY": "sk-cloud-secret-123456", "TEAM_A_KEY": "team-a-key-123456"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spillway.toml"
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str = FULL, env: dict[str, str] | None = None) -> Config:
    return load_config(write(tmp_path, text), ENV if env is None else env)


def config_error(raw: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        validate(raw)
    return info.value


def node(**fields: Any) -> dict[str, Any]:
    return {"kind": "cloud", "base_url": "https://x.example/v1", "models": {"m": "n"}, **fields}


def test_full_config_loads(tmp_path: Path) -> None:
    config = load(tmp_path)
    assert list(config.nodes) == ["ascend-1", "cloud"]
    private, cloud = config.nodes["ascend-1"], config.nodes["cloud"]
    assert private.base_url == "http://10.0.0.5:8000/v1"  # trailing slash dropped
    assert (private.max_concurrency, private.weight, private.load_signal) == (8, 2.0, "mindie")
    assert cloud.api_key is not None
    assert cloud.api_key.get_secret_value() == "sk-cloud-secret-123456"
    assert cloud.base_url == "https://api.example.com/v1"
    assert config.server.port == 8100
    [key] = config.keys
    assert (key.key.get_secret_value(), key.tenant, key.private_only) == (
        "team-a-key-123456",
        "team-a",
        True,
    )
    assert config.public_models() == ["default"]


def test_secrets_do_not_show_in_repr(tmp_path: Path) -> None:
    assert "sk-cloud-secret" not in repr(load(tmp_path))


def test_timeouts_for_merges_node_overrides_over_globals(tmp_path: Path) -> None:
    config = load(tmp_path)
    assert config.timeouts_for("ascend-1") == Timeouts(
        connect_s=2.0, first_token_s=90.0, idle_s=45.0
    )
    assert config.timeouts_for("cloud") == Timeouts(connect_s=2.0, first_token_s=20.0)


def test_interpolation_uses_env_and_defaults() -> None:
    raw = {"a": "${X}", "b": ["pre-${X}-${Y:-dflt}"], "c": {"d": "${Y:-}"}, "n": 3}
    assert interpolate(raw, {"X": "1"}) == {"a": "1", "b": ["pre-1-dflt"], "c": {"d": ""}, "n": 3}


def test_interpolation_prefers_env_over_default() -> None:
    assert interpolate("${Y:-dflt}", {"Y": "set"}) == "set"


def test_interpolation_default_covers_empty_variable() -> None:
    assert interpolate("${Y:-dflt}", {"Y": ""}) == "dflt"


@pytest.mark.parametrize(
    ("missing", "path"),
    [("CLOUD_KEY", "nodes.cloud.api_key"), ("TEAM_A_KEY", "keys[0].key")],
)
def test_missing_env_var_names_the_setting(tmp_path: Path, missing: str, path: str) -> None:
    env = {k: v for k, v in ENV.items() if k != missing}
    with pytest.raises(ConfigError) as info:
        load(tmp_path, env=env)
    assert info.value.path == path
    assert missing in info.value.problem


def test_bad_base_url_names_the_setting(tmp_path: Path) -> None:
    text = FULL.replace("http://10.0.0.5:8000/v1/", "10.0.0.5:8000")
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert info.value.path == "nodes.ascend-1.base_url"
    assert "not a URL" in info.value.problem


def test_unknown_setting_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, FULL.replace("weight = 2.0", "wieght = 2.0"))
    assert info.value.path == "nodes.ascend-1.wieght"
    assert "unknown setting" in info.value.problem


def test_missing_kind_is_required() -> None:
    error = config_error({"nodes": {"a": {"base_url": "http://x/v1", "models": {"m": "n"}}}})
    assert error.path == "nodes.a.kind"
    assert "required" in error.problem


def test_empty_models_rejected() -> None:
    error = config_error({"nodes": {"a": node(models={})}})
    assert error.path == "nodes.a.models"
    assert "at least one" in error.problem


def test_node_needs_base_url_or_managed() -> None:
    error = config_error({"nodes": {"a": {"kind": "private", "models": {"m": "n"}}}})
    assert error.path == "nodes.a"
    assert "base_url is required" in error.problem


def test_managed_cloud_node_rejected() -> None:
    managed_cloud = {"kind": "cloud", "managed": {}, "models": {"m": "n"}}
    error = config_error({"nodes": {"a": managed_cloud}})
    assert error.path == "nodes.a"
    assert "'private'" in error.problem


def test_managed_node_with_base_url_rejected() -> None:
    error = config_error({"nodes": {"a": node(kind="private", managed={})}})
    assert error.path == "nodes.a"
    assert "not both" in error.problem


def test_missing_tokenizer_file_rejected(tmp_path: Path) -> None:
    error = config_error({"nodes": {"a": node(tokenizer=str(tmp_path / "none.gguf"))}})
    assert error.path == "nodes.a.tokenizer"
    assert "no such file" in error.problem


def test_node_name_with_spaces_rejected() -> None:
    error = config_error({"nodes": {"my node": node()}})
    assert error.path == "nodes"
    assert "'my node'" in error.problem


def test_no_nodes_rejected() -> None:
    assert config_error({"nodes": {}}).path == "nodes"


def test_duplicate_keys_rejected() -> None:
    key = {"key": "same-key-123", "tenant": "t"}
    error = config_error({"nodes": {"a": node()}, "keys": [key, {**key, "tenant": "u"}]})
    assert error.path == "keys"
    assert "entry 1" in error.problem
    assert "same-key-123" not in str(error)


def test_short_key_rejected() -> None:
    error = config_error({"nodes": {"a": node()}, "keys": [{"key": "short", "tenant": "t"}]})
    assert error.path == "keys[0].key"
    assert "too short" in error.problem


def test_bad_timeout_names_the_setting() -> None:
    error = config_error({"nodes": {"a": node(timeouts={"idle_s": 0})}})
    assert error.path == "nodes.a.timeouts.idle_s"


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[nodes.a\nkind = 1")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(path) in info.value.problem
    assert "not valid TOML" in info.value.problem


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml", {})


def test_embedded_config_without_keys_has_only_the_local_node() -> None:
    raw = embedded_config({})
    assert list(raw["nodes"]) == ["local"]
    local = raw["nodes"]["local"]
    assert local["kind"] == "private"
    assert "managed" in local


def test_embedded_config_adds_cloud_node_after_local() -> None:
    raw = embedded_config({"DEEPSEEK_API_KEY": "sk-deepseek-123456", "OPENAI_API_KEY": "  "})
    assert list(raw["nodes"]) == ["local", "deepseek"]
    deepseek = raw["nodes"]["deepseek"]
    assert deepseek["kind"] == "cloud"
    assert deepseek["api_key"] == "sk-deepseek-123456"


def test_load_config_without_file_validates_the_embedded_config() -> None:
    config = load_config(None, {"DEEPSEEK_API_KEY": "sk-deepseek-123456"})
    assert list(config.nodes) == ["local", "deepseek"]
    assert config.nodes["local"].managed is not None
    assert config.nodes["deepseek"].kind == "cloud"
    assert config.public_models() == ["default"]


def test_overrides_apply_only_values_that_are_set() -> None:
    config = load_config(None, {}, {"port": 9001, "host": None})
    assert config.server.port == 9001
    assert config.server.host == "127.0.0.1"


def test_overrides_are_validated() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {}, {"port": 70000})
    assert info.value.path == "server.port"


def test_environ_reads_dotenv_with_real_environment_winning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("SPILLWAY_T_BOTH=from-file\nSPILLWAY_T_FILE=file-only\n")
    monkeypatch.setenv("SPILLWAY_T_BOTH", "from-env")
    monkeypatch.delenv("SPILLWAY_T_FILE", raising=False)
    env = environ(dotenv)
    assert env["SPILLWAY_T_BOTH"] == "from-env"
    assert env["SPILLWAY_T_FILE"] == "file-only"


def test_environ_without_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPILLWAY_T_ONLY", "x")
    assert environ(None)["SPILLWAY_T_ONLY"] == "x"
    assert environ(tmp_path / "missing.env")["SPILLWAY_T_ONLY"] == "x"


@pytest.mark.parametrize(
    "url", ["redis://:se/cret-pw@127.0.0.1:6379/0", "redis://:ab#cret-pw@h:6379/0", "redis://h/x"]
)
def test_a_redis_url_that_will_not_parse_is_refused_without_quoting_it(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate({"state": {"redis_url": url}, "nodes": {"a": node()}})
    assert caught.value.path == "state.redis_url" and "percent-encode" in caught.value.problem
    assert "cret-pw" not in caught.value.message


def test_state_and_limits_settings() -> None:
    config = validate(
        {
            "state": {"redis_url": "redis://:p%2Fw@h:6379/2", "lease_s": 5},
            "limits": {"output_reserve_tokens": 64},
            "nodes": {"a": node()},
            "keys": [{"key": "k" * 12, "tenant": "t", "rpm": 60, "tpm": 1000, "max_parallel": 2}],
        }
    )
    assert config.state.lease_s == 5 and config.limits.output_reserve_tokens == 64
    assert (config.keys[0].rpm, config.keys[0].tpm, config.keys[0].max_parallel) == (60, 1000, 2)
    with pytest.raises(ConfigError, match="lease_s"):
        validate({"state": {"lease_s": 45}, "nodes": {"a": node()}})
