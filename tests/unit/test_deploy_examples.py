"""docs/deploy's examples are checked, not just shown.

- Every document of ``docs/deploy/kubernetes.yaml`` is valid Kubernetes (``kubernetes-validate``,
  strict: an unknown or misspelled field fails), and its parts refer to each other correctly.
- The ConfigMap's ``spillway.toml`` loads with spillway's own loader, its ``${VAR}``s filled
  from the Secret beside it: so every variable it uses is one the Deployment provides.
- ``docs/deploy/nginx.conf`` passes ``nginx -t`` (skipped where nginx is not installed), and its
  timeouts and body limit fit spillway's defaults.
- ``docs/deploy.md`` quotes these files as they are.
"""

from __future__ import annotations

import copy
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]

from spillway.config.load import load_config
from spillway.config.schema import Config, ServerConfig, Timeouts
from spillway.errors import ConfigError
from spillway.ledger.writer import CLOSE_TIMEOUT_S
from spillway.server.listener import SHUTDOWN_GRACE_S
from tests.nginx import free_port, main_config, nginx_binary, on_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY_MD = ROOT / "docs" / "deploy.md"
MANIFESTS = ROOT / "docs" / "deploy" / "kubernetes.yaml"
NGINX_CONF = ROOT / "docs" / "deploy" / "nginx.conf"
#: Checked against one fixed version, so that a new kubernetes-validate release cannot change
#: what passes. 1.30: the first where the preStop ``sleep`` action is on by default.
K8S_VERSION = "1.30"
KINDS = ("ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget")
NGINX_TIMEOUT_S = 30


Manifest = dict[str, Any]


def manifests() -> list[Manifest]:
    with MANIFESTS.open() as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def manifest(kind: str) -> Manifest:
    (found,) = [doc for doc in manifests() if doc["kind"] == kind]
    return found


def pod_spec() -> Manifest:
    return cast(Manifest, manifest("Deployment")["spec"]["template"]["spec"])


def container() -> Manifest:
    (only,) = pod_spec()["containers"]
    return cast(Manifest, only)


def secret_env() -> dict[str, str]:
    """The Secret's placeholder values: the environment every replica gets (envFrom)."""
    return cast(dict[str, str], manifest("Secret")["stringData"])


def spillway_toml() -> str:
    return cast(str, manifest("ConfigMap")["data"]["spillway.toml"])


def load_example(tmp_path: Path, text: str) -> Config:
    """What ``spillway serve --config`` does with the file: read, interpolate, validate."""
    path = tmp_path / "spillway.toml"
    path.write_text(text)
    return load_config(path, secret_env())


# Kubernetes


def test_the_manifests_are_the_five_documents_deploy_md_describes() -> None:
    assert sorted(doc["kind"] for doc in manifests()) == sorted(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_each_manifest_is_valid_kubernetes_in_strict_mode(kind: str) -> None:
    validated = kubernetes_validate.validate(manifest(kind), K8S_VERSION, strict=True)
    assert validated == K8S_VERSION


def test_strict_validation_rejects_a_misspelled_field() -> None:
    # Proves the check can fail. The same misspelling passes without strict mode, whose
    # schemas allow unknown fields: strict is what catches a field that would do nothing.
    deployment = copy.deepcopy(manifest("Deployment"))
    spec = deployment["spec"]["template"]["spec"]
    spec["containers"][0]["readinessProb"] = spec["containers"][0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinessProb"):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    assert kubernetes_validate.validate(deployment, K8S_VERSION, strict=False) == K8S_VERSION


def test_strict_validation_rejects_a_wrong_type() -> None:
    deployment = copy.deepcopy(manifest("Deployment"))
    deployment["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_the_deployment_uses_the_configmap_and_the_secret() -> None:
    pod = pod_spec()
    (config_volume,) = [v for v in pod["volumes"] if "configMap" in v]
    assert config_volume["configMap"]["name"] == manifest("ConfigMap")["metadata"]["name"]
    (mount,) = [m for m in container()["volumeMounts"] if m["name"] == config_volume["name"]]
    args = container()["args"]
    assert args[args.index("--config") + 1] == f"{mount['mountPath']}/spillway.toml"
    (source,) = container()["envFrom"]
    assert source["secretRef"]["name"] == manifest("Secret")["metadata"]["name"]


def test_the_probes_and_the_grace_period_fit_spillway() -> None:
    spec = container()
    assert spec["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert spec["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # SIGTERM comes after preStop; then in-flight requests drain and the ledger flushes.
    pre_stop = spec["lifecycle"]["preStop"]["sleep"]["seconds"]
    needed = pre_stop + SHUTDOWN_GRACE_S + CLOSE_TIMEOUT_S
    assert pod_spec()["terminationGracePeriodSeconds"] >= max(45, needed)


def test_the_service_and_the_budget_select_the_deployments_pods() -> None:
    deployment = manifest("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert manifest("Service")["spec"]["selector"].items() <= labels.items()
    budget = manifest("PodDisruptionBudget")["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert budget.get("maxUnavailable") == 1 or budget.get("minAvailable") == 2


# spillway.toml


def test_the_configmaps_spillway_toml_loads_with_the_secrets_values(tmp_path: Path) -> None:
    # load_config fails on any ${VAR} the Secret does not set: every variable the file uses
    # is one the Deployment provides (envFrom).
    config = load_example(tmp_path, spillway_toml())
    assert config.state.redis_url is not None
    assert config.ledger.url is not None
    assert config.ledger.url.get_secret_value().startswith("postgresql")
    assert config.cache.store == "redis"
    assert config.cache.secret is not None  # replicas must share it to share the cache
    assert config.keys  # it listens on 0.0.0.0: without keys anyone could use the nodes


def test_the_loader_rejects_a_misspelled_setting_in_the_example(tmp_path: Path) -> None:
    text = spillway_toml().replace("lease_s = ", "lease_secs = ", 1)
    assert text != spillway_toml()
    with pytest.raises(ConfigError) as caught:
        load_example(tmp_path, text)
    assert caught.value.path == "state.lease_secs"


# nginx


def nginx_directive(name: str) -> str:
    """The value of the one ``name`` directive in the example."""
    pattern = re.compile(rf"^\s*{name}\s+([^;]+);", re.MULTILINE)
    (match,) = pattern.finditer(NGINX_CONF.read_text())
    return match.group(1)


def test_nginx_timeouts_and_body_limit_fit_spillways_defaults() -> None:
    # A request without "stream" is silent until its answer, up to deadline_s.
    assert _seconds(nginx_directive("proxy_read_timeout")) > Timeouts().deadline_s
    # nginx must close an idle upstream connection before spillway does.
    assert _seconds(nginx_directive("keepalive_timeout")) < ServerConfig().keepalive_timeout_s
    assert _bytes(nginx_directive("client_max_body_size")) >= ServerConfig().max_body_bytes
    assert nginx_directive("proxy_buffering") == "off"
    assert nginx_directive("proxy_http_version") == "1.1"


def _seconds(value: str) -> float:
    number, unit = _number_and_unit(value, "sm")
    return number * {"": 1, "s": 1, "m": 60}[unit]


def _bytes(value: str) -> int:
    number, unit = _number_and_unit(value, "km")
    return number * {"": 1, "k": 1024, "m": 1024 * 1024}[unit]


def _number_and_unit(value: str, units: str) -> tuple[int, str]:
    """nginx's "630s", "16m", "4096": the number and its unit ("" for none), lower case."""
    match = re.fullmatch(rf"(\d+)([{units}]?)", value.lower())
    assert match is not None, f"not a plain nginx size or time: {value!r}"
    return int(match.group(1)), match.group(2)


@pytest.fixture
def nginx() -> str:
    return nginx_binary()


def nginx_test(nginx: str, conf: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` on ``conf`` (an http-context file) in a main config rooted in
    ``tmp_path``; ``nginx -t`` binds the listening sockets, so on a free loopback port."""
    main = main_config(on_port(conf, free_port()), tmp_path)
    return subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", str(main)],
        capture_output=True,
        text=True,
        timeout=NGINX_TIMEOUT_S,
        check=False,
    )


def test_nginx_accepts_the_example(nginx: str, tmp_path: Path) -> None:
    checked = nginx_test(nginx, NGINX_CONF.read_text(), tmp_path)
    assert checked.returncode == 0, checked.stderr


def test_nginx_check_fails_on_a_broken_config(nginx: str, tmp_path: Path) -> None:
    broken = NGINX_CONF.read_text().replace("least_conn;", "least_connections;")
    checked = nginx_test(nginx, broken, tmp_path)
    assert checked.returncode != 0
    assert "least_connections" in checked.stderr


# deploy.md


def fenced_blocks(markdown: str) -> Iterator[tuple[str, str]]:
    """(language, text) of every fenced code block."""
    for match in re.finditer(r"^```(\w*)\n(.*?)^```$", markdown, re.MULTILINE | re.DOTALL):
        yield match.group(1), match.group(2)


@pytest.mark.parametrize(
    ("language", "text"),
    [
        ("nginx", NGINX_CONF.read_text),
        ("yaml", MANIFESTS.read_text),
        ("toml", spillway_toml),
    ],
    ids=["nginx.conf", "kubernetes.yaml", "spillway.toml"],
)
def test_deploy_md_quotes_the_checked_files_as_they_are(
    language: str, text: Callable[[], str]
) -> None:
    quoted = [body for lang, body in fenced_blocks(DEPLOY_MD.read_text()) if lang == language]
    assert text() in quoted, f"docs/deploy.md has no ```{language} block equal to the file"
