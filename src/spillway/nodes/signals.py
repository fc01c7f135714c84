"""Engine load signals: an inference engine's Prometheus ``/metrics`` page, read as one load.

A node names its engine in ``load_signal``; one reader per engine, dispatched by ``READERS``,
turns the parsed page into requests waiting, requests running and KV-cache use. All of it is
pure except ``MetricsSource.fetch_load``, the one network call, which answers ``None``
instead of raising: a missing load signal must never fail a request. It goes through the
node's own transport (proxy, TLS, headers), on a small pool of its own, since a metrics URL
may name another host or port than the node's ``base_url``.

Sources sit next to each reader. vLLM (V0, V1), SGLang and llama.cpp: names, labels and paths
read in each engine's source. MindIE: names and endpoint from Huawei's documentation and
MindIE-LLM's ``PrometheusMetrics`` source, not checked against a running MindIE; whether every
release serves on ``metricsPort`` and whether any reports ``npu_cache_usage_perc`` as 0..100
(the source writes 0..1; the reader accepts both) are unconfirmed.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from spillway.nodes.pool import Pool
from spillway.nodes.transport import Transport

#: Larger is not a metrics page (vLLM's is ~100 kB); the cap also bounds parsing (~0.1 s).
MAX_BODY_BYTES = 4 * 1024 * 1024

# One sample line of the text exposition format: name, optional {labels}, value, optional
# timestamp, optional OpenMetrics exemplar ("# {...} v"). Quoted label values may hold escaped
# quotes, braces, '#' and spaces; each alternative below is disjoint, so matching stays linear.
_PAIR = r'\s*[a-zA-Z_][a-zA-Z0-9_]*\s*=\s*"(?:[^"\\\n]|\\.)*"\s*'
_SAMPLE = re.compile(
    r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    rf"(?:\{{(?:{_PAIR}(?:,{_PAIR})*,?)?\s*\}}\s*|\s+)"
    r"(?P<value>\S+)(?:\s+(?P<ts>[^#\s]\S*))?\s*(?:#.*)?"
)


def parse_prometheus(text: str) -> dict[str, float]:
    """Map each metric name to its value summed over all label sets.

    Comments (``# HELP``, ``# TYPE``) and blank lines are ignored; ``_bucket``, ``_sum``,
    ``_count`` and ``_created`` series keep their own names. Values may be ``NaN``, ``+Inf``,
    ``-Inf`` or use exponents; a sum that meets ``NaN`` is ``NaN``, as in PromQL. A timestamp
    after the value is accepted and ignored. Malformed lines are skipped; this never raises.
    """
    totals: dict[str, float] = {}
    for raw in text.split("\n"):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.fullmatch(line)
        if match is None:
            continue
        value = _number(match["value"])
        if value is None or (match["ts"] is not None and _number(match["ts"]) is None):
            continue
        totals[match["name"]] = totals.get(match["name"], 0.0) + value
    return totals


def _number(token: str) -> float | None:
    # float() also takes "1_000"; the exposition format does not, so neither do we.
    if "_" in token:
        return None
    try:
        return float(token)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """One engine's load at scrape time, summed over its data-parallel ranks.

    ``waiting``: requests queued in the engine, not yet scheduled. ``running``: requests in
    the running batch. ``kv_usage``: KV-cache use as a 0..1 fraction, ``None`` where the
    engine does not report it.
    """

    waiting: float
    running: float
    kv_usage: float | None


Reader = Callable[[dict[str, float]], EngineLoad | None]


def _count(metrics: dict[str, float], name: str) -> float | None:
    value = metrics.get(name)
    return value if value is not None and math.isfinite(value) and value >= 0 else None


def _first(metrics: dict[str, float], *names: str) -> float | None:
    for name in names:
        value = metrics.get(name)
        if value is not None and math.isfinite(value):
            return value
    return None


def _fraction(value: float | None, *, may_be_percent: bool = False) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    if may_be_percent and value > 1.0:
        value /= 100.0
    return min(max(value, 0.0), 1.0)


def read_vllm(metrics: dict[str, float]) -> EngineLoad | None:
    """vLLM, V0 and V1 engines (vllm-ascend runs vLLM's engine, so its metrics too)."""
    # V1: vllm-project/vllm vllm/v1/metrics/loggers.py: vllm:num_requests_waiting,
    # vllm:num_requests_running, vllm:kv_cache_usage_perc (0..1; replaced gpu_cache_usage_perc
    # in 0.9), labels model_name + engine (one series per DP engine core). V0: vllm/engine/
    # metrics.py (https://docs.vllm.ai/en/v0.5.3/serving/metrics.html), gpu_cache_usage_perc,
    # label model_name. GET /metrics on the API port (docs.vllm.ai/en/stable/usage/metrics/).
    waiting = _count(metrics, "vllm:num_requests_waiting")
    running = _count(metrics, "vllm:num_requests_running")
    if waiting is None or running is None:
        return None
    usage = _first(metrics, "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
    # Fractions were summed over engines; cache_config_info is 1 per engine, so it counts them.
    engines = max(_count(metrics, "vllm:cache_config_info") or 1.0, 1.0)
    return EngineLoad(waiting, running, _fraction(None if usage is None else usage / engines))


def read_sglang(metrics: dict[str, float]) -> EngineLoad | None:
    """SGLang, started with ``--enable-metrics``."""
    # sgl-project/sglang python/sglang/srt/metrics/collector.py: sglang:num_queue_reqs,
    # sglang:num_running_reqs, sglang:token_usage (0..1), sglang:num_used_tokens,
    # sglang:max_total_num_tokens; labels model_name, engine_type, tp_rank, pp_rank, dp_rank
    # (srt/managers/scheduler_metrics_mixin.py). GET /metrics on the API port
    # (https://docs.sglang.io/references/production_metrics.html).
    waiting = _count(metrics, "sglang:num_queue_reqs")
    running = _count(metrics, "sglang:num_running_reqs")
    if waiting is None or running is None:
        return None
    # Used over total tokens stays exact across DP ranks; token_usage would be a sum of ratios.
    used = _count(metrics, "sglang:num_used_tokens")
    total = _count(metrics, "sglang:max_total_num_tokens")
    usage = used / total if used is not None and total else _first(metrics, "sglang:token_usage")
    return EngineLoad(waiting, running, _fraction(usage))


def read_llamacpp(metrics: dict[str, float]) -> EngineLoad | None:
    """llama.cpp's C++ server, started with ``--metrics``."""
    # ggml-org/llama.cpp tools/server/server-context.cpp (metrics route): gauges
    # llamacpp:requests_processing, llamacpp:requests_deferred, no labels; GET /metrics.
    # llamacpp:kv_cache_usage_ratio (0..1) was in builds before mid-2025 (server README then),
    # removed in PR #13660 (per PR #24010's discussion): current builds give kv_usage None.
    waiting = _count(metrics, "llamacpp:requests_deferred")
    running = _count(metrics, "llamacpp:requests_processing")
    if waiting is None or running is None:
        return None
    return EngineLoad(waiting, running, _fraction(_first(metrics, "llamacpp:kv_cache_usage_ratio")))


def read_mindie(metrics: dict[str, float]) -> EngineLoad | None:
    """Huawei MindIE Service (Ascend), with ``MIES_SERVICE_MONITOR_MODE=1`` set."""
    # https://www.hiascend.com/document/detail/zh/mindie/21RC1/mindieservice/servicedev/mindie_service0103.html
    # (服务管控指标查询接口, 普罗格式): GET https://{managementIpAddress}:{metricsPort}/metrics,
    # un-prefixed names num_requests_running, num_requests_waiting, num_requests_swapped,
    # label model_name. MindIE-LLM source (mindie_llm::PrometheusMetrics): npu_cache_usage_perc
    # = used/total NPU blocks, 0..1; a value above 1 can only be a percentage. Defaults in
    # Ascend/MindIE-LLM src/server/conf/config.json: port 1025, metricsPort 1027, HTTPS on.
    waiting = _count(metrics, "num_requests_waiting")
    running = _count(metrics, "num_requests_running")
    if waiting is None or running is None:
        return None
    usage = _fraction(_first(metrics, "npu_cache_usage_perc"), may_be_percent=True)
    return EngineLoad(waiting, running, usage)


def _read_nothing(metrics: dict[str, float]) -> EngineLoad | None:
    """``load_signal = "none"``: the node is ranked by spillway's own counts only."""
    return None


#: load_signal name → reader.
READERS: dict[str, Reader] = {
    "vllm": read_vllm,
    "sglang": read_sglang,
    "llamacpp": read_llamacpp,
    "mindie": read_mindie,
    "none": _read_nothing,
}

#: Default metrics path per engine that has one ("none" has none).
METRICS_PATH: dict[str, str] = {
    name: "/metrics" for name in ("vllm", "sglang", "llamacpp", "mindie")
}

#: Engines whose metrics listen on their own port, not the API's: MindIE's metricsPort.
METRICS_PORT: dict[str, int] = {"mindie": 1027}


def metrics_url(base_url: str, engine: str, *, port: int | None = None) -> str:
    """The metrics URL for a node's OpenAI ``base_url``: a trailing ``/v1`` gives way to the path.

    ``http://10.0.0.11:8000/v1`` → ``http://10.0.0.11:8000/metrics``. A path prefix before
    ``/v1`` (a reverse proxy's) is kept. ``port`` overrides the port; MindIE defaults to its
    ``metricsPort`` 1027, and its metrics may also listen on a separate management address,
    which only the operator knows. Raises ``ValueError`` for an engine without metrics.
    """
    if engine not in METRICS_PATH:
        raise ValueError(f"load_signal {engine!r} has no metrics endpoint")
    parts = urlsplit(base_url)
    path = parts.path.rstrip("/").removesuffix("/v1")
    netloc = parts.netloc
    port = port if port is not None else METRICS_PORT.get(engine)
    if port is not None:
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        userinfo, at, _ = parts.netloc.rpartition("@")
        netloc = f"{userinfo}{at}{host}:{port}"
    return urlunsplit((parts.scheme, netloc, path + METRICS_PATH[engine], "", ""))


class MetricsSource:
    """One node's metrics page, fetched through the node's transport on one kept-alive
    connection of its own (a scrape every second or so reuses it)."""

    def __init__(self, url: str, transport: Transport | None = None) -> None:
        """``ValueError`` for a URL the client cannot fetch (not http(s), user:password@)."""
        parts = urlsplit(url)
        origin = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
        self.url = url
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._pool = Pool(
            origin,
            headers={"Accept": "text/plain;version=0.0.4"},
            max_connections=1,
            max_body_bytes=MAX_BODY_BYTES,
            transport=transport,
        )

    async def fetch_load(self, engine: str, timeout_s: float) -> EngineLoad | None:
        """Scrape the page and read it as ``engine``; ``None`` when there is no usable signal.

        Network errors, timeouts, a status other than 200, an oversized or unreadable page and
        unknown engines all give ``None``. The whole call, connect to last byte, is bounded by
        ``timeout_s``. Cancellation still propagates.
        """
        reader = READERS.get(engine)
        if reader is None or engine not in METRICS_PATH:
            return None
        try:
            async with asyncio.timeout(timeout_s):
                resp = await self._pool.request(
                    "GET", self._target, None, connect_timeout_s=timeout_s
                )
                body = await resp.read()
        # The one boundary where a scrape's failures end: whatever the network, the proxy or
        # the engine did wrong, the router only needs to know that there is no signal now.
        except Exception:
            return None
        if resp.status != 200:
            return None
        return reader(parse_prometheus(body.decode("utf-8", errors="replace")))

    async def aclose(self) -> None:
        await self._pool.aclose()
