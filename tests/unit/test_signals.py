"""Engine load-signal readers: the parser, each engine's reader on a real-format page, the
metrics URL, and the scrape against a small in-process aiohttp server."""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from spillway.nodes.signals import (
    MAX_BODY_BYTES,
    METRICS_PATH,
    READERS,
    EngineLoad,
    MetricsSource,
    Reader,
    metrics_url,
    parse_prometheus,
    read_llamacpp,
    read_mindie,
    read_sglang,
    read_vllm,
)

DATA = Path(__file__).parent / "data" / "metrics"


def sample(name: str) -> dict[str, float]:
    return parse_prometheus((DATA / f"{name}.txt").read_text())


# --- readers against sample pages -------------------------------------------------------


@pytest.mark.parametrize(
    ("page", "engine", "expected"),
    [
        # two DP engine cores: counts add up, KV use is the mean of 0.5 and 0.25
        ("vllm_v1", "vllm", EngineLoad(waiting=7.0, running=21.0, kv_usage=0.375)),
        ("vllm_v0", "vllm", EngineLoad(waiting=2.0, running=5.0, kv_usage=0.4375)),
        # two DP ranks: (30000 + 10000) used of (100000 + 100000) tokens
        ("sglang", "sglang", EngineLoad(waiting=5.0, running=16.0, kv_usage=0.2)),
        ("llamacpp", "llamacpp", EngineLoad(waiting=2.0, running=3.0, kv_usage=None)),
        ("llamacpp_legacy", "llamacpp", EngineLoad(waiting=0.0, running=1.0, kv_usage=0.171875)),
        ("mindie", "mindie", EngineLoad(waiting=17.0, running=48.0, kv_usage=0.62109375)),
    ],
)
def test_reader_on_sample_page(page: str, engine: str, expected: EngineLoad) -> None:
    assert READERS[engine](sample(page)) == expected


def test_sample_pages_keep_histogram_series_under_their_own_names() -> None:
    metrics = sample("vllm_v1")
    assert metrics["vllm:time_to_first_token_seconds_count"] == 1566.0 + 1508.0
    assert metrics["vllm:request_success_total"] == 1502 + 61 + 3 + 1449 + 58 + 1
    assert "vllm:time_to_first_token_seconds" not in metrics
    assert sample("mindie")["time_to_first_token_seconds_bucket"] == 2267 * 5 + 2251 + 2230 + (
        2101 + 1764 + 1020 + 755 + 301 + 12
    )


@pytest.mark.parametrize("engine", sorted(READERS))
def test_every_reader_answers_none_without_metrics(engine: str) -> None:
    assert READERS[engine]({}) is None


@pytest.mark.parametrize(
    ("reader", "waiting_only"),
    [
        (read_vllm, {"vllm:num_requests_waiting": 1.0}),
        (read_sglang, {"sglang:num_queue_reqs": 1.0}),
        (read_llamacpp, {"llamacpp:requests_deferred": 1.0}),
        (read_mindie, {"num_requests_waiting": 1.0}),
    ],
)
def test_reader_needs_both_counts(reader: Reader, waiting_only: dict[str, float]) -> None:
    assert reader(waiting_only) is None


def test_vllm_prefers_kv_cache_usage_over_the_deprecated_name() -> None:
    metrics = {
        "vllm:num_requests_waiting": 0.0,
        "vllm:num_requests_running": 1.0,
        "vllm:kv_cache_usage_perc": 0.25,
        "vllm:gpu_cache_usage_perc": 0.75,
    }
    assert read_vllm(metrics) == EngineLoad(0.0, 1.0, 0.25)


def test_vllm_without_cache_usage_or_with_nan_usage() -> None:
    counts = {"vllm:num_requests_waiting": 4.0, "vllm:num_requests_running": 2.0}
    assert read_vllm(counts) == EngineLoad(4.0, 2.0, None)
    assert read_vllm({**counts, "vllm:kv_cache_usage_perc": math.nan}) == EngineLoad(4.0, 2.0, None)


def test_nan_count_means_no_signal() -> None:
    assert (
        read_vllm({"vllm:num_requests_waiting": math.nan, "vllm:num_requests_running": 1}) is None
    )


def test_sglang_falls_back_to_token_usage() -> None:
    metrics = {"sglang:num_queue_reqs": 1.0, "sglang:num_running_reqs": 2.0}
    assert read_sglang({**metrics, "sglang:token_usage": 0.28}) == EngineLoad(1.0, 2.0, 0.28)
    # an empty pool (total 0) cannot give a ratio either
    zero = {**metrics, "sglang:num_used_tokens": 0.0, "sglang:max_total_num_tokens": 0.0}
    assert read_sglang(zero) == EngineLoad(1.0, 2.0, None)


def test_mindie_percentages_become_fractions() -> None:
    counts = {"num_requests_waiting": 10.0, "num_requests_running": 20.0}
    assert read_mindie({**counts, "npu_cache_usage_perc": 30.0}) == EngineLoad(10.0, 20.0, 0.3)
    assert read_mindie({**counts, "npu_cache_usage_perc": 1.0}) == EngineLoad(10.0, 20.0, 1.0)


def test_mindie_coordinator_nan_spelling_gives_no_kv() -> None:
    # MindIE-MS writes NaN as "Nan" when it cannot weigh the pods' cache use.
    page = "num_requests_waiting 1\nnum_requests_running 2\nnpu_cache_usage_perc Nan\n"
    assert read_mindie(parse_prometheus(page)) == EngineLoad(1.0, 2.0, None)


def test_kv_usage_is_clamped_to_a_fraction() -> None:
    counts = {"llamacpp:requests_deferred": 0.0, "llamacpp:requests_processing": 0.0}
    assert read_llamacpp({**counts, "llamacpp:kv_cache_usage_ratio": 1.5}) == EngineLoad(0, 0, 1.0)
    assert read_llamacpp({**counts, "llamacpp:kv_cache_usage_ratio": -1}) == EngineLoad(0, 0, 0.0)


# --- parser ----------------------------------------------------------------------------


def test_parse_ignores_comments_and_blank_lines() -> None:
    text = "# HELP a An a.\n# TYPE a gauge\n\n   \na 1\n  # indented comment 5\n"
    assert parse_prometheus(text) == {"a": 1.0}


def test_parse_sums_label_sets() -> None:
    text = 'x{engine="0"} 1.5\nx{engine="1"} 2.5\nx 1\ny{a="b"} 4\n'
    assert parse_prometheus(text) == {"x": 5.0, "y": 4.0}


def test_parse_keeps_histogram_and_summary_series_apart() -> None:
    text = (
        "# TYPE h histogram\n"
        'h_bucket{le="0.1"} 1\nh_bucket{le="+Inf"} 3\nh_sum 0.7\nh_count 3\n'
        "# TYPE s summary\n"
        's{quantile="0.5"} 0.2\ns_sum 9\ns_count 4\nh_created 1.7e9\n'
    )
    assert parse_prometheus(text) == {
        "h_bucket": 4.0,
        "h_sum": 0.7,
        "h_count": 3.0,
        "s": 0.2,
        "s_sum": 9.0,
        "s_count": 4.0,
        "h_created": 1.7e9,
    }


def test_parse_special_values() -> None:
    parsed = parse_prometheus("a NaN\nb +Inf\nc -Inf\nd Nan\ne Inf\n")
    assert math.isnan(parsed["a"]) and math.isnan(parsed["d"])
    assert parsed["b"] == math.inf and parsed["e"] == math.inf
    assert parsed["c"] == -math.inf


def test_parse_nan_poisons_the_sum() -> None:
    assert math.isnan(parse_prometheus('x{a="1"} NaN\nx{a="2"} 2\n')["x"])


def test_parse_exponents() -> None:
    text = "a 8.128902e+06\nb 2E-3\nc 1e3\nd -4.5e-1\ne .5\n"
    assert parse_prometheus(text) == {
        "a": 8128902.0,
        "b": 0.002,
        "c": 1000.0,
        "d": -0.45,
        "e": 0.5,
    }


def test_parse_timestamp_after_value() -> None:
    text = 'a 3 1700000000000\nb{x="y"} 4 -1700000000000\nc 5 1.7e12\n'
    assert parse_prometheus(text) == {"a": 3.0, "b": 4.0, "c": 5.0}


def test_parse_label_values_with_escapes_and_syntax_characters() -> None:
    text = (
        'a{path="C:\\\\dir\\"q\\"",msg="line\\nnext"} 1\n'
        'b{q="} 99",h="# not a comment",s="a, b=\\"c\\""} 2\n'
        'c{le="+Inf" , x = "y" ,} 3\n'
        "d{} 4\n"
    )
    assert parse_prometheus(text) == {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}


def test_parse_openmetrics_exemplar_and_eof() -> None:
    text = 'h_bucket{le="1"} 3 # {trace_id="abc"} 0.5 1700000000.1\nx 1\n# EOF\n'
    assert parse_prometheus(text) == {"h_bucket": 3.0, "x": 1.0}


def test_parse_crlf_lines() -> None:
    assert parse_prometheus("a 1\r\nb 2\r\n") == {"a": 1.0, "b": 2.0}


@pytest.mark.parametrize(
    "line",
    [
        'x{a="1" 2',  # labels never closed
        'x{a="1} 2',  # quote never closed
        "x{a=1} 2",  # unquoted label value
        'x{1a="b"} 2',  # bad label name
        "x",  # no value
        "x abc",  # not a number
        "x 1_000",  # Python float would take it; the format does not
        "x 1 2 3",  # too many fields
        "x 1 ts",  # timestamp not a number
        "1x 2",  # bad metric name
        "x-y 2",
        "{} 2",
        'x{a="1"}} 2',
        "x\x00 1",
    ],
)
def test_parse_skips_malformed_lines(line: str) -> None:
    assert parse_prometheus(f"ok 1\n{line}\nok 2\n") == {"ok": 3.0}


def test_parse_never_raises_on_garbage() -> None:
    garbage = "\x00\xff}{" * 1000 + "\n" + "{" * 10_000 + "\n" + '"' * 5000 + "\n"
    assert parse_prometheus(garbage) == {}
    assert parse_prometheus("") == {}


# --- metrics URL ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base_url", "engine", "expected"),
    [
        ("http://10.0.0.11:8000/v1", "vllm", "http://10.0.0.11:8000/metrics"),
        ("http://10.0.0.11:8000/v1/", "vllm", "http://10.0.0.11:8000/metrics"),
        ("http://10.0.0.12:30000", "sglang", "http://10.0.0.12:30000/metrics"),
        ("http://10.0.0.12:30000/", "sglang", "http://10.0.0.12:30000/metrics"),
        ("http://127.0.0.1:8080/v1", "llamacpp", "http://127.0.0.1:8080/metrics"),
        ("https://gw.internal/pool-a/v1", "vllm", "https://gw.internal/pool-a/metrics"),
        ("http://node/v1beta", "vllm", "http://node/v1beta/metrics"),
        ("http://node:8000/v1?x=1#f", "vllm", "http://node:8000/metrics"),
        ("http://[fd00::11]:8000/v1", "vllm", "http://[fd00::11]:8000/metrics"),
        # MindIE serves metrics on its own metricsPort (1027 by default), not the API port
        ("https://10.0.0.13:1025/v1", "mindie", "https://10.0.0.13:1027/metrics"),
        ("https://mindie.internal/v1", "mindie", "https://mindie.internal:1027/metrics"),
        ("https://[fd00::13]:1025/v1", "mindie", "https://[fd00::13]:1027/metrics"),
    ],
)
def test_metrics_url(base_url: str, engine: str, expected: str) -> None:
    assert metrics_url(base_url, engine) == expected


def test_metrics_url_port_override() -> None:
    assert metrics_url("https://10.0.0.13:1025/v1", "mindie", port=9100) == (
        "https://10.0.0.13:9100/metrics"
    )
    assert metrics_url("http://u:p@10.0.0.11:8000/v1", "vllm", port=9000) == (
        "http://u:p@10.0.0.11:9000/metrics"
    )


@pytest.mark.parametrize("engine", ["none", "tgi", ""])
def test_metrics_url_refuses_engines_without_metrics(engine: str) -> None:
    with pytest.raises(ValueError, match="no metrics endpoint"):
        metrics_url("http://10.0.0.11:8000/v1", engine)


def test_every_engine_with_a_path_has_a_reader() -> None:
    assert set(METRICS_PATH) <= set(READERS)
    assert set(READERS) == {"vllm", "sglang", "llamacpp", "mindie", "none"}


# --- fetch_load against an in-process server --------------------------------------------


class MetricsServer:
    """Serves the sample pages and misbehaves on chosen paths."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._transports: set[int] = set()  # the connections pages were served on

    @property
    def connections(self) -> int:
        return len(self._transports)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/page/{name}", self._page)
        app.router.add_get("/status/{code}", self._status)
        app.router.add_get("/stall", self._stall)
        app.router.add_get("/stall-body", self._stall_body)
        app.router.add_get("/huge", self._huge)
        app.router.add_get("/binary", self._binary)
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _page(self, request: web.Request) -> web.Response:
        self._transports.add(id(request.transport))
        text = (DATA / f"{request.match_info['name']}.txt").read_text()
        return web.Response(text=text, content_type="text/plain")

    async def _status(self, request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="no")

    async def _stall(self, request: web.Request) -> web.Response:
        await self.release.wait()
        return web.Response(text="vllm:num_requests_waiting 1\n")

    async def _stall_body(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"vllm:num_requests_waiting 1\n")
        await self.release.wait()
        return resp

    async def _huge(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        line = b"vllm:num_requests_waiting 1\nvllm:num_requests_running 1\n" * 1024
        for _ in range(MAX_BODY_BYTES // len(line) + 2):
            await resp.write(line)
        return resp

    async def _binary(self, request: web.Request) -> web.Response:
        return web.Response(body=bytes(range(256)) * 64, content_type="application/octet-stream")


@pytest.fixture
async def server() -> AsyncIterator[MetricsServer]:
    running = MetricsServer()
    await running.start()
    yield running
    await running.stop()


async def fetch_load(url: str, engine: str, timeout_s: float) -> EngineLoad | None:
    """One scrape through a fresh source, closed after."""
    source = MetricsSource(url)
    try:
        return await source.fetch_load(engine, timeout_s)
    finally:
        await source.aclose()


@pytest.mark.parametrize(
    ("page", "engine", "expected"),
    [
        ("vllm_v1", "vllm", EngineLoad(7.0, 21.0, 0.375)),
        ("sglang", "sglang", EngineLoad(5.0, 16.0, 0.2)),
        ("llamacpp", "llamacpp", EngineLoad(2.0, 3.0, None)),
        ("mindie", "mindie", EngineLoad(17.0, 48.0, 0.62109375)),
    ],
)
async def test_fetch_load_reads_a_served_page(
    server: MetricsServer, page: str, engine: str, expected: EngineLoad
) -> None:
    assert await fetch_load(server.url(f"/page/{page}"), engine, 2.0) == expected


async def test_a_source_keeps_its_connection_between_scrapes(server: MetricsServer) -> None:
    source = MetricsSource(server.url("/page/vllm_v1?x=1"))
    for _ in range(3):
        assert await source.fetch_load("vllm", 2.0) == EngineLoad(7.0, 21.0, 0.375)
    assert server.connections == 1
    await source.aclose()


@pytest.mark.parametrize("code", [500, 404, 503, 204])
async def test_fetch_load_non_200_is_none(server: MetricsServer, code: int) -> None:
    assert await fetch_load(server.url(f"/status/{code}"), "vllm", 2.0) is None


async def test_fetch_load_wrong_engine_for_the_page_is_none(server: MetricsServer) -> None:
    assert await fetch_load(server.url("/page/sglang"), "vllm", 2.0) is None


@pytest.mark.parametrize("path", ["/stall", "/stall-body"])
async def test_fetch_load_stall_is_none_within_the_timeout(
    server: MetricsServer, path: str
) -> None:
    timeout_s = 0.3
    start = time.monotonic()
    assert await fetch_load(server.url(path), "vllm", timeout_s) is None
    assert time.monotonic() - start < timeout_s + 0.2


async def test_fetch_load_closed_port_is_none() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    assert await fetch_load(f"http://127.0.0.1:{port}/metrics", "vllm", 1.0) is None
    assert time.monotonic() - start < 1.2


async def test_fetch_load_oversized_or_binary_body_is_none(server: MetricsServer) -> None:
    assert await fetch_load(server.url("/huge"), "vllm", 5.0) is None
    assert await fetch_load(server.url("/binary"), "vllm", 2.0) is None


@pytest.mark.parametrize("url", ["not a url", "ftp://127.0.0.1/metrics", "http://:0/metrics"])
def test_a_url_the_client_cannot_fetch_is_refused_when_the_source_is_made(url: str) -> None:
    with pytest.raises(ValueError):
        MetricsSource(url)


@pytest.mark.parametrize("engine", ["none", "tgi"])
async def test_fetch_load_engine_without_metrics_is_none(
    server: MetricsServer, engine: str
) -> None:
    assert await fetch_load(server.url("/page/vllm_v1"), engine, 2.0) is None


async def test_fetch_load_lets_cancellation_through(server: MetricsServer) -> None:
    source = MetricsSource(server.url("/stall"))
    task = asyncio.create_task(source.fetch_load("vllm", 5.0))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await source.aclose()


async def test_fetch_load_on_a_closed_source_is_none(server: MetricsServer) -> None:
    source = MetricsSource(server.url("/page/vllm_v1"))
    await source.aclose()
    assert await source.fetch_load("vllm", 1.0) is None
