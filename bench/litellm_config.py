"""LiteLLM's proxy as a bench/harness.py candidate: its config (models at the nginx upstream,
everything that costs time off) and a uvicorn logging config with the access log off."""

from __future__ import annotations

from typing import Any


def proxy_config(nginx_base: str, key: str) -> dict[str, Any]:
    """LiteLLM's config file (written as JSON: YAML is a superset of JSON)."""
    upstream = {"model": "openai/gpt-4o-mini", "api_key": "sk-upstream-dummy"}
    return {  # YAML is a superset of JSON
        "model_list": [
            {
                "model_name": "bench",
                "litellm_params": upstream | {"api_base": f"{nginx_base}/v1"},
            },
            {
                "model_name": "bench-stream",
                "litellm_params": upstream | {"api_base": f"{nginx_base}/sse/v1"},
            },
        ],
        "general_settings": {
            "master_key": key,
            "disable_spend_logs": True,
            "disable_error_logs": True,
        },
        "litellm_settings": {
            "set_verbose": False,
            "json_logs": False,
            "telemetry": False,
            "callbacks": [],
            "success_callback": [],
            "failure_callback": [],
            "service_callback": [],
            "turn_off_message_logging": True,
            "disable_streaming_logging": True,
            "disable_token_counter": True,
            "disable_end_user_cost_tracking": True,
            "disable_hf_tokenizer_download": True,
            "suppress_debug_info": True,
            "drop_params": True,
            "request_timeout": 600,
        },
    }


UVICORN_QUIET_LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "stream": "ext://sys.stderr",
        }
    },
    "loggers": {
        "uvicorn": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
        "uvicorn.error": {"level": "WARNING"},
        "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
    },
}
