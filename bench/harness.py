"""The benchmark behind ``bench/run``: one fixed-reply nginx upstream, then each candidate in
turn (started, checked, warmed up, measured, stopped), then bench/results/latest.{md,json,png}.

Run it through ``bench/run`` (which installs nginx, wrk and LiteLLM's venv and traps exit);
directly: ``.venv/bin/python bench/harness.py --workdir $(mktemp -d) [--smoke]``.

Settings (environment): BENCH_SECONDS (each measured wrk run, default 10; smoke 3),
BENCH_WARMUP_SECONDS (default 3; smoke 1), BENCH_SETTLE_SECONDS (pause before each measured
phase, default 1.5; smoke 0.5), BENCH_LATENCY_RUNS (c=1 runs averaged, default 2;
smoke 1), BENCH_TTFT_N (default 300; smoke 30), BENCH_START_TIMEOUT (seconds a candidate has to
answer, default 180), BENCH_CANDIDATES (comma-separated subset of direct, spillway-1w,
spillway-redis, spillway-2w, spillway-hit, litellm, floor), BENCH_OUT (default bench/results,
smoke: bench/results/smoke).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import litellm_config
import procs
import report

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV_BIN = Path(sys.executable).parent
LITELLM_BIN = BENCH / ".venv-litellm" / "bin"
KEY = "sk-bench-2f6c1e0b9a4d47c3"  # the one client key every candidate gets (LiteLLM: master key)
CANDIDATES = (
    "direct",
    "spillway-1w",
    "spillway-redis",
    "spillway-2w",
    "spillway-hit",
    "litellm",
    "floor",
)
LABELS = {
    "direct": "direct (nginx)",
    "spillway-1w": "spillway, 1 worker",
    "spillway-redis": "spillway, 1 worker, [state] redis_url",
    "spillway-2w": "spillway, 2 workers",
    "spillway-hit": "spillway, 1 worker, exact cache hits",
    "litellm": "LiteLLM proxy 1.80.0, 1 worker",
    "floor": "floor (bare aiohttp proxy)",
}


#: more failed requests than this share of a candidate's wrk requests makes it "failed"
ERROR_SHARE = 0.01


class CandidateFailed(Exception):
    pass


class Skipped(Exception):
    pass


@dataclass(frozen=True)
class Settings:
    seconds: float
    warmup_s: float
    settle_s: float
    latency_runs: int
    ttft_n: int
    ttft_warmup: int
    start_timeout_s: float
    quiet_wait_s: float
    candidates: tuple[str, ...]
    out_dir: Path
    smoke: bool

    @classmethod
    def from_env(cls, smoke: bool) -> Settings:
        env = os.environ
        chosen = tuple(
            c.strip() for c in env.get("BENCH_CANDIDATES", ",".join(CANDIDATES)).split(",")
        )
        unknown = [c for c in chosen if c not in CANDIDATES]
        if unknown:
            sys.exit(f"bench: unknown candidate(s) {unknown}; choose from {', '.join(CANDIDATES)}")
        default_out = BENCH / "results" / ("smoke" if smoke else "")
        return cls(
            seconds=float(env.get("BENCH_SECONDS", 3 if smoke else 10)),
            warmup_s=float(env.get("BENCH_WARMUP_SECONDS", 1 if smoke else 3)),
            settle_s=float(env.get("BENCH_SETTLE_SECONDS", 0.5 if smoke else 1.5)),
            latency_runs=int(env.get("BENCH_LATENCY_RUNS", 1 if smoke else 2)),
            ttft_n=int(env.get("BENCH_TTFT_N", 30 if smoke else 300)),
            ttft_warmup=int(env.get("BENCH_TTFT_WARMUP", 5 if smoke else 20)),
            start_timeout_s=float(env.get("BENCH_START_TIMEOUT", 180)),
            quiet_wait_s=float(env.get("BENCH_QUIET_WAIT", 0 if smoke else 120)),
            candidates=chosen,
            out_dir=Path(env.get("BENCH_OUT", default_out)),
            smoke=smoke,
        )


@dataclass
class Target:
    """Where the load goes for one candidate."""

    base: str  # http://127.0.0.1:PORT
    chat_path: str = "/v1/chat/completions"
    stream_path: str = "/v1/chat/completions"
    models_path: str = "/v1/models"
    chat_model: str = "bench"
    stream_model: str = "bench-stream"
    proc: procs.Proc | None = None  # None: nothing of its own to stop (direct)
    memory_pid: int = 0  # the root of the process tree whose memory counts
    #: a header every measured answer must carry after the warm-up (name, value prefix)
    expect_header: tuple[str, str] | None = None


@dataclass
class Result:
    name: str
    label: str
    status: str = "ok"  # ok | failed: … | skipped: …
    command: str = ""
    start_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    latency_runs: list[dict[str, float]] = field(default_factory=list)
    rps: float | None = None
    c64_p50_ms: float | None = None
    c64_p99_ms: float | None = None
    errors: int = 0
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    rss_mb: float | None = None
    pss_mb: float | None = None
    processes: int | None = None
    other_cpu_pct: float | None = None  # CPU used by processes outside the benchmark meanwhile
    log_tail: str = ""


@dataclass
class Context:
    settings: Settings
    workdir: Path
    nginx_base: str
    nginx: procs.Proc
    #: helpers a candidate started (its redis-server), stopped with it
    extra: list[procs.Proc] = field(default_factory=list)


# --- upstream -------------------------------------------------------------------------------


def start_nginx(workdir: Path, timeout_s: float) -> tuple[procs.Proc, str]:
    port = procs.free_port()
    conf = workdir / "nginx.conf"
    template = (BENCH / "nginx.conf.template").read_text()
    conf.write_text(template.replace("@@DIR@@", str(workdir)).replace("@@PORT@@", str(port)))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    argv = [nginx, "-e", str(workdir / "nginx-error.log"), "-p", f"{workdir}/", "-c", str(conf)]
    proc = procs.start("nginx", argv, workdir)
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, base + "/v1/models", timeout_s, key="")
    return proc, base


# --- candidates ------------------------------------------------------------------------------


def cand_direct(ctx: Context, name: str) -> Target:
    return Target(
        base=ctx.nginx_base,
        stream_path="/sse/v1/chat/completions",
        memory_pid=ctx.nginx.pid,
    )


def spillway_has_workers() -> bool:
    out = subprocess.run(
        [str(VENV_BIN / "spillway"), "serve", "--help"], capture_output=True, text=True, check=False
    )
    return "--workers" in out.stdout


def cand_spillway(
    ctx: Context, name: str, workers: int, cache: str = "off", shared: bool = False
) -> Target:
    """spillway with auth and the ledger on. The response cache is off (``cache="off"``) for
    the proxy figures: every wrk request is the same temperature-0 body, which the default
    exact cache would answer after the first. ``cache="exact"`` measures those hits.
    ``shared``: with ``[state] redis_url`` (a redis-server of the bench's own), so every
    request claims its node slot in Redis: what shared state adds to a request."""
    if workers > 1 and not spillway_has_workers():
        raise Skipped("--workers not available (spillway serve --help does not list it)")
    port = procs.free_port()
    config = ctx.workdir / f"{name}.toml"
    state = f'[state]\nredis_url = "{start_redis(ctx, name)}"\n' if shared else ""
    config.write_text(
        f"""# generated by bench/harness.py
[server]
access_log = false

{state}
[ledger]
enabled = true          # the default: SQLite at DATA_DIR/ledger.db

[cache]
mode = "{cache}"

[nodes.upstream]
kind = "private"
base_url = "{ctx.nginx_base}/v1"
models = {{ "bench" = "gpt-4o-mini" }}
max_concurrency = 1024

[nodes.upstream-sse]
kind = "private"
base_url = "{ctx.nginx_base}/sse/v1"
models = {{ "bench-stream" = "gpt-4o-mini" }}
max_concurrency = 1024

[[keys]]
key = "{KEY}"
tenant = "bench"
"""
    )
    argv = [
        str(VENV_BIN / "spillway"),
        "serve",
        "--config",
        str(config),
        "--port",
        str(port),
        "--data-dir",
        str(ctx.workdir / f"{name}-data"),
    ]
    if workers > 1:
        argv += ["--workers", str(workers)]
    proc = procs.start(name, argv, ctx.workdir, env=_clean_env())
    target = Target(base=f"http://127.0.0.1:{port}", proc=proc, memory_pid=proc.pid)
    if cache != "off":
        target.expect_header = ("x-spillway-cache", "hit-")
    return target


def start_redis(ctx: Context, name: str) -> str:
    """A redis-server for this candidate (no persistence, loopback); its URL."""
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(server).exists():
        raise Skipped("redis-server not installed (apt-get install redis-server)")
    port = procs.free_port()
    argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    argv += ["no", "--dir", str(ctx.workdir)]
    proc = procs.start(f"{name}-redis", argv, ctx.workdir)
    ctx.extra.append(proc)
    deadline = time.monotonic() + 10
    while not procs.port_open(port):
        if time.monotonic() > deadline or proc.popen.poll() is not None:
            raise CandidateFailed("redis-server did not start")
        time.sleep(0.05)
    return f"redis://127.0.0.1:{port}/0"


def cand_litellm(ctx: Context, name: str) -> Target:
    litellm = LITELLM_BIN / "litellm"
    if not litellm.exists():
        raise CandidateFailed(f"{litellm} not found (bench/run creates bench/.venv-litellm)")
    port = procs.free_port()
    config = litellm_config.proxy_config(ctx.nginx_base, KEY)
    path = ctx.workdir / f"{name}.yaml"
    path.write_text(json.dumps(config, indent=2))
    # uvicorn's access log off, the rest at WARNING (LITELLM_LOG does not reach uvicorn)
    log_config = ctx.workdir / f"{name}-logging.json"
    log_config.write_text(json.dumps(litellm_config.UVICORN_QUIET_LOGGING, indent=2))
    argv = [
        str(litellm),
        "--config",
        str(path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
        "--telemetry",
        "False",
        "--log_config",
        str(log_config),
    ]
    env = _clean_env() | {
        "LITELLM_LOG": "ERROR",
        "LITELLM_MODE": "PRODUCTION",  # no load_dotenv
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the price map from the internet
        "DISABLE_ADMIN_UI": "True",
        "NO_DOCS": "True",
        "HF_HUB_OFFLINE": "1",
    }
    proc = procs.start(name, argv, ctx.workdir, env=env)
    return Target(base=f"http://127.0.0.1:{port}", proc=proc, memory_pid=proc.pid)


def cand_floor(ctx: Context, name: str) -> Target:
    port = procs.free_port()
    argv = [
        sys.executable,
        str(BENCH / "floor_proxy.py"),
        "--port",
        str(port),
        "--route",
        f"bench={ctx.nginx_base}/v1",
        "--route",
        f"bench-stream={ctx.nginx_base}/sse/v1",
    ]
    proc = procs.start(name, argv, ctx.workdir, env=_clean_env())
    return Target(base=f"http://127.0.0.1:{port}", proc=proc, memory_pid=proc.pid)


STARTERS: dict[str, Callable[[Context, str], Target]] = {
    "direct": cand_direct,
    "spillway-1w": lambda ctx, name: cand_spillway(ctx, name, 1),
    "spillway-redis": lambda ctx, name: cand_spillway(ctx, name, 1, shared=True),
    "spillway-2w": lambda ctx, name: cand_spillway(ctx, name, 2),
    "spillway-hit": lambda ctx, name: cand_spillway(ctx, name, 1, cache="exact"),
    "litellm": cand_litellm,
    "floor": cand_floor,
}


def _clean_env() -> dict[str, str]:
    """This environment without proxy settings or a database URL, which could send a candidate
    somewhere other than loopback."""
    drop = {"http_proxy", "https_proxy", "all_proxy", "database_url", "spillway_config"}
    env = {k: v for k, v in os.environ.items() if k.lower() not in drop}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


# --- checks ----------------------------------------------------------------------------------


def wait_ready(proc: procs.Proc | None, url: str, timeout_s: float, key: str = KEY) -> float:
    """Poll ``url`` until it answers 200; the seconds that took."""
    start = time.monotonic()
    last = "no answer"
    while time.monotonic() - start < timeout_s:
        if proc is not None and not proc.alive():
            raise CandidateFailed(
                f"exited with status {proc.popen.returncode} before answering; log tail:\n"
                + proc.log_tail()
            )
        try:
            status, body = procs.http_request(url, key, timeout=5)
            if status == 200:
                return time.monotonic() - start
            last = f"HTTP {status}: {body[:200]!r}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)
    tail = proc.log_tail() if proc is not None else ""
    raise CandidateFailed(f"did not answer {url} within {timeout_s:.0f} s ({last})\n{tail}")


def check_header(target: Target) -> None:
    """The wrk request (bench/chat.lua's body) gets the header the candidate promises."""
    if target.expect_header is None:
        return
    name, prefix = target.expect_header
    messages = [
        {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
        {"role": "user", "content": "What is the capital of France? Answer in one sentence."},
    ]
    body: dict[str, object] = {
        "model": target.chat_model,
        "messages": messages,
        "max_tokens": 64,
        "temperature": 0,
    }
    headers: dict[str, str] = {}
    status, _ = procs.http_request(target.base + target.chat_path, KEY, body, headers_out=headers)
    if status != 200 or not headers.get(name, "").startswith(prefix):
        raise CandidateFailed(
            f"expected {name}: {prefix}… after the warm-up, got HTTP {status}, "
            f"{name}: {headers.get(name)!r}"
        )


def check_answers(target: Target) -> None:
    """One ordinary and one streaming completion must come back whole."""
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    body: dict[str, object] = {"model": target.chat_model, "messages": messages, "max_tokens": 64}
    status, raw = procs.http_request(target.base + target.chat_path, KEY, body)
    if status != 200 or b'"choices"' not in raw:
        raise CandidateFailed(f"chat completion: HTTP {status}: {raw[:300]!r}")
    stream = body | {
        "model": target.stream_model,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    status, raw = procs.http_request(target.base + target.stream_path, KEY, stream)
    if status != 200 or b"data: [DONE]" not in raw or b'"usage"' not in raw:
        raise CandidateFailed(f"streaming completion: HTTP {status}: {raw[:300]!r}")


# --- load ------------------------------------------------------------------------------------


def wrk(target: Target, threads: int, connections: int, seconds: float) -> dict[str, float]:
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(BENCH / "chat.lua"),
        target.base + target.chat_path,
    ]
    env = os.environ | {"BENCH_MODEL": target.chat_model, "BENCH_KEY": KEY}
    out = subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=seconds + 60, check=False
    )
    for line in out.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            raw = json.loads(line.removeprefix("BENCH_RESULT "))
            errors = sum(v for k, v in raw.items() if k.startswith("err_"))
            return {
                "requests": raw["requests"],
                "rps": raw["requests"] / (raw["duration_us"] / 1e6),
                "p50_ms": raw["p50_us"] / 1000,
                "p99_ms": raw["p99_us"] / 1000,
                "errors": errors,
                "status_errors": raw["err_status"],
            }
    raise CandidateFailed(f"wrk printed no result (exit {out.returncode}): {out.stderr[-500:]}")


def ttft(target: Target, settings: Settings) -> dict[str, float]:
    argv = [
        sys.executable,
        str(BENCH / "ttft.py"),
        "--url",
        target.base + target.stream_path,
        "--model",
        target.stream_model,
        "--key",
        KEY,
        "-n",
        str(settings.ttft_n),
        "--warmup",
        str(settings.ttft_warmup),
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if out.returncode != 0:
        raise CandidateFailed(f"ttft.py failed: {out.stderr[-500:]}")
    result: dict[str, float] = json.loads(out.stdout)
    if result.get("errors"):
        raise CandidateFailed(
            f"ttft: {result['errors']} failed streams: {result.get('first_error')}"
        )
    return result


def measure(ctx: Context, name: str) -> Result:
    settings = ctx.settings
    result = Result(name=name, label=LABELS[name])
    target: Target | None = None
    try:
        started = time.monotonic()
        target = STARTERS[name](ctx, name)
        if target.proc is not None:
            argv = " ".join(str(a) for a in target.proc.popen.args)  # type: ignore[union-attr]
            result.command = argv.replace(str(ctx.workdir), "$TMP").replace(f"{ROOT}/", "")
            wait_ready(target.proc, target.base + target.models_path, settings.start_timeout_s)
        result.start_s = time.monotonic() - started
        check_answers(target)
        other = procs.OtherLoad()
        say(f"  {name}: answering after {result.start_s:.1f} s; warming up")
        wrk(target, 2, 64, settings.warmup_s)
        wrk(target, 1, 1, settings.warmup_s)
        check_header(target)

        runs = []
        for _ in range(settings.latency_runs):
            time.sleep(settings.settle_s)
            runs.append(wrk(target, 1, 1, settings.seconds))
        result.latency_runs = runs
        result.p50_ms = sum(r["p50_ms"] for r in runs) / len(runs)
        result.p99_ms = sum(r["p99_ms"] for r in runs) / len(runs)
        say(f"  {name}: c=1 p50 {result.p50_ms:.3f} ms, p99 {result.p99_ms:.3f} ms")

        time.sleep(settings.settle_s)
        load = wrk(target, 2, 64, settings.seconds)
        result.rps, result.c64_p50_ms, result.c64_p99_ms = (
            load["rps"],
            load["p50_ms"],
            load["p99_ms"],
        )
        result.errors = int(sum(r["errors"] for r in [*runs, load]))
        requests = sum(r["requests"] for r in [*runs, load])
        if result.errors > ERROR_SHARE * requests:
            raise CandidateFailed(
                f"{result.errors} of {requests} wrk requests failed (non-2xx, timeouts, resets)"
            )
        say(f"  {name}: c=64 {result.rps:.0f} req/s, {result.errors} errors")

        time.sleep(settings.settle_s)  # what the c=64 run left (a ledger flush, GC) is not TTFT
        first = ttft(target, settings)
        result.ttft_p50_ms, result.ttft_p99_ms = first["p50_ms"], first["p99_ms"]
        say(f"  {name}: TTFT p50 {result.ttft_p50_ms:.3f} ms, p99 {result.ttft_p99_ms:.3f} ms")

        mem = procs.memory(target.memory_pid)
        result.rss_mb, result.pss_mb, result.processes = mem.rss_mb, mem.pss_mb, mem.processes
        result.other_cpu_pct = other.percent()
        if target.proc is not None and not target.proc.alive():
            raise CandidateFailed("exited during the run:\n" + target.proc.log_tail())
        if result.errors:
            result.status = f"ok, with {result.errors} wrk errors (non-2xx, timeouts, resets)"
    except Skipped as exc:
        result.status = f"skipped: {exc}"
    except (CandidateFailed, subprocess.TimeoutExpired, OSError, ValueError, KeyError) as exc:
        first_line, _, rest = str(exc).partition("\n")
        result.status = f"failed: {first_line}"
        result.log_tail = rest
    finally:
        if target is not None and target.proc is not None:
            procs.stop(target.proc)
        while ctx.extra:
            procs.stop(ctx.extra.pop())
    return result


# --- main ------------------------------------------------------------------------------------


QUIET_PCT = 20.0


def wait_quiet(limit_s: float) -> float:
    """Wait (up to ``limit_s``) until other processes use less than QUIET_PCT of the CPUs;
    return how busy they kept them over the last second."""
    deadline = time.monotonic() + limit_s
    said = 0.0
    while True:
        probe = procs.OtherLoad()
        time.sleep(1)
        busy = probe.percent()
        if busy < QUIET_PCT or time.monotonic() >= deadline:
            return busy
        if time.monotonic() - said > 15:
            say(f"bench: other work keeps the CPUs {busy:.0f}% busy; waiting for it to finish")
            said = time.monotonic()


def say(text: str) -> None:
    print(text, flush=True)


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="an empty scratch directory")
    parser.add_argument("--smoke", action="store_true", help="short runs, results/smoke/")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _terminate)
    settings = Settings.from_env(args.smoke)
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    began = time.time()
    say(
        f"bench: {settings.seconds:g} s per wrk run, {settings.latency_runs} run(s) at c=1, "
        f"{settings.ttft_n} streams for TTFT; candidates: {', '.join(settings.candidates)}"
    )
    if shutil.which("wrk") is None:
        sys.exit("bench: wrk not found (bench/run installs it)")
    load_before = report.load_average()
    busy = wait_quiet(settings.quiet_wait_s)
    if busy > QUIET_PCT:
        say(f"bench: warning: other work keeps the CPUs {busy:.0f}% busy; figures will be noisy")
    nginx, nginx_base = start_nginx(workdir, 30)
    results: list[Result] = []
    try:
        ctx = Context(settings, workdir, nginx_base, nginx)
        for name in settings.candidates:
            say(f"bench: {LABELS[name]}")
            result = measure(ctx, name)
            if result.status != "ok":
                say(f"  {name}: {result.status}")
                if result.log_tail:
                    say("    " + result.log_tail.replace("\n", "\n    "))
            results.append(result)
    finally:
        procs.stop(nginx)
    info = report.machine_info(ROOT, VENV_BIN, LITELLM_BIN)
    info["other CPU use before the run"] = f"{busy:.0f}% of all CPUs (1 s sample)"
    info["load average before / after"] = f"{load_before} / {report.load_average()}"
    run = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(began)),
        "duration_s": time.time() - began,
        "cpu_busy_before": busy,
        "settings": json.loads(json.dumps(asdict(settings), default=str)),
        "machine": info,
        "results": [asdict(r) for r in results],
    }
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    (settings.out_dir / "latest.json").write_text(json.dumps(run, indent=2) + "\n")
    markdown = report.markdown(run)
    (settings.out_dir / "latest.md").write_text(markdown)
    report.chart(run, settings.out_dir / "latest.png")
    say("")
    say(report.table(run))
    say("")
    say(report.ratios_text(run))
    out = settings.out_dir
    say(f"\nbench: done in {run['duration_s']:.0f} s; wrote {out}/latest.md, .png, .json")
    if not any(r.status.startswith("ok") for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
