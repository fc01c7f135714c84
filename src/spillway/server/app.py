"""The aiohttp application: routes, middleware, and the Gateway built in a cleanup context."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping
from pathlib import Path

from aiohttp import web

from spillway.clock import Clock, SystemClock
from spillway.config.schema import Config
from spillway.server.cors import CORS, Cors
from spillway.server.middleware import gateway_middleware
from spillway.server.routes import admin, admin_keys, batches, chat, info
from spillway.server.state import gateway_context

log = logging.getLogger("spillway.server")


def build_app(
    config: Config,
    clock: Clock | None = None,
    supervised: Mapping[str, Path] | None = None,
    processes: int = 1,
) -> web.Application:
    """``supervised``: managed nodes another process runs, with their status files;
    ``processes``: how many gateway processes share the port (``--workers``)."""
    app = web.Application(
        client_max_size=config.server.max_body_bytes,
        middlewares=[gateway_middleware],
    )
    cors = app[CORS] = Cors(config.server.cors)
    if cors.enabled:
        app.on_response_prepare.append(cors.grant)
    context = gateway_context(config, clock or SystemClock(), supervised, processes)
    app.cleanup_ctx.append(context)
    app.router.add_post("/v1/chat/completions", chat.chat_completions)
    app.router.add_post("/v1/embeddings", chat.embeddings)
    app.router.add_get("/v1/models", info.list_models)
    app.router.add_get("/v1/models/{model}", info.get_model)
    app.router.add_post("/v1/files", batches.upload_file)
    app.router.add_get("/v1/files", batches.list_files)
    app.router.add_get("/v1/files/{file_id}", batches.get_file)
    app.router.add_get("/v1/files/{file_id}/content", batches.file_content)
    app.router.add_delete("/v1/files/{file_id}", batches.delete_file)
    app.router.add_post("/v1/batches", batches.create_batch)
    app.router.add_get("/v1/batches", batches.list_batches)
    app.router.add_get("/v1/batches/{batch_id}", batches.get_batch)
    app.router.add_post("/v1/batches/{batch_id}/cancel", batches.cancel_batch)
    app.router.add_get("/healthz", info.healthz)
    app.router.add_get("/readyz", info.readyz)
    app.router.add_get("/admin/nodes", admin.nodes)
    app.router.add_get("/admin/keys", admin_keys.list_keys)
    app.router.add_post("/admin/keys", admin_keys.create_key)
    app.router.add_post("/admin/keys/{ident}/revoke", admin_keys.revoke_key)
    app.router.add_delete("/admin/keys/{ident}", admin_keys.revoke_key)
    app.router.add_post("/admin/keys/{ident}/rotate", admin_keys.rotate_key)
    app.router.add_get("/admin/audit", admin_keys.audit)
    return app


def open_to_network_warning(config: Config) -> str | None:
    """A warning when the gateway has no keys yet listens beyond loopback, else None."""
    if config.keys or _is_loopback(config.server.host):
        return None
    return (
        f"spillway is listening on {config.server.host} with no [[keys]] configured: anyone "
        "who can reach this port can use every node, including paid cloud nodes. "
        "Add [[keys]] to spillway.toml or listen on 127.0.0.1."
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
