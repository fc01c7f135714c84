"""Reading configuration: TOML file, ``${VAR}`` interpolation, ``.env``, validation.

This is the only module that reads ``os.environ``; everything else gets values passed in.
Every problem becomes a ``ConfigError`` whose path names the exact setting.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dotenv import dotenv_values
from pydantic import ValidationError

from spillway.config.defaults import embedded_config
from spillway.config.proxies import ProxyEnvironment, split_no_proxy, with_environment_proxies
from spillway.config.schema import Config
from spillway.errors import ConfigError

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
CONFIG_ENV = "SPILLWAY_CONFIG"
DEFAULT_FILE = Path("spillway.toml")


def environ(dotenv: Path | None = Path(".env")) -> dict[str, str]:
    """The process environment over the ``.env`` file (the real environment wins)."""
    merged: dict[str, str] = {}
    if dotenv is not None and dotenv.is_file():
        merged.update({k: v for k, v in dotenv_values(dotenv).items() if v is not None})
    merged.update(os.environ)
    return merged


def find_config_file(explicit: Path | None, env: Mapping[str, str]) -> Path | None:
    """``--config``, else ``$SPILLWAY_CONFIG``, else ``./spillway.toml`` if present, else None."""
    if explicit is not None:
        return explicit
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    return DEFAULT_FILE if DEFAULT_FILE.is_file() else None


def load_config(
    path: Path | None,
    env: Mapping[str, str],
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Load ``path`` (or the embedded default when None) and apply ``[server]`` overrides;
    nodes that set no ``proxy`` get the environment's (``proxy_environment``)."""
    if path is None:
        raw: dict[str, Any] = embedded_config(env)
    else:
        raw = interpolate(read_toml(path), env)
    if overrides:
        server = dict(raw.get("server", {}))
        server.update({k: v for k, v in overrides.items() if v is not None})
        raw["server"] = server
    return with_environment_proxies(validate(raw), proxy_environment(env))


def proxy_environment(env: Mapping[str, str]) -> ProxyEnvironment:
    """``https_proxy``, ``http_proxy`` and ``no_proxy``, each lower case first, then upper
    case (as httpx and Python's urllib: a lower-case variable that is set wins even when
    empty; curl ignores upper-case ``HTTP_PROXY``, spillway does not). Empty means none."""
    https_var, https = _variable(env, "https_proxy")
    http_var, http = _variable(env, "http_proxy")
    _, no_proxy = _variable(env, "no_proxy")
    return ProxyEnvironment(
        https=https or None,
        http=http or None,
        no_proxy=split_no_proxy(no_proxy),
        https_var=https_var,
        http_var=http_var,
    )


def _variable(env: Mapping[str, str], lower: str) -> tuple[str, str]:
    """The variable's name as found (for messages) and its value ("" when unset)."""
    if lower in env:
        return lower, env[lower].strip()
    upper = lower.upper()
    return upper, env.get(upper, "").strip()


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError("", f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{path} is not valid TOML: {exc}") from None


def interpolate(value: Any, env: Mapping[str, str], path: str = "") -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string, recursively."""
    if isinstance(value, str):
        return _interpolate_string(value, env, path)
    if isinstance(value, dict):
        return {k: interpolate(v, env, _join(path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _interpolate_string(text: str, env: Mapping[str, str], path: str) -> str:
    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if default is not None:
            return env.get(name) or default  # like the shell: an empty value takes the default
        if name in env:
            return env[name]
        raise ConfigError(path, f"environment variable {name} is not set")

    return _VAR.sub(substitute, text)


def validate(raw: Mapping[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(_loc_path(first["loc"]), _problem(first)) from None


def _loc_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" not in str(part):  # pydantic adds tags such as 'function-after[...]'
            path = _join(path, str(part))
    return path


def _problem(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    if kind == "missing":
        return "required setting is missing"
    if kind == "extra_forbidden":
        return "unknown setting (check the spelling in docs/configuration.md)"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
