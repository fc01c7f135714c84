"""What bench/harness.py writes: machine info, the results table, the ratios that matter,
bench/results/latest.md and latest.png (matplotlib)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

RSS_BUDGET_MB = 150.0
NOISY_PCT = 10.0  # other processes' share of the CPUs above which latest.md warns
SPILLWAY = ("spillway-1w", "spillway-redis", "spillway-2w", "spillway-hit")
HIT_P50_TARGET_MS = 2.0  # exact cache hit, end to end, at concurrency 1
REDIS_P50_TARGET_MS = 0.3  # what shared state may add to a request (scale-out issue)

Run = dict[str, Any]
Row = dict[str, Any]


# --- machine ---------------------------------------------------------------------------------


def _cmd(argv: list[str], cwd: Path | None = None) -> str:
    if shutil.which(argv[0]) is None and not Path(argv[0]).exists():
        return "not installed"
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=cwd, check=False)
    except OSError as exc:
        return f"unknown ({exc})"
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def machine_info(root: Path, venv_bin: Path, litellm_bin: Path) -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        meminfo = Path("/proc/meminfo").read_text()
        mem_kib = int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1))  # type: ignore[union-attr]
        memory = f"{mem_kib / 1024 / 1024:.1f} GiB"
    except (OSError, AttributeError):
        memory = "unknown"
    commit = _cmd(["git", "rev-parse", "--short", "HEAD"], cwd=root)
    dirty = _cmd(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
    if commit != "unknown" and dirty not in ("unknown", ""):
        commit += " (with uncommitted changes)"
    litellm_python = litellm_bin / "python"
    if litellm_python.exists():
        script = (
            "import importlib.metadata as m\n"
            "print(' '.join(f'{p} {m.version(p)}' for p in ('litellm', 'uvicorn', 'httptools')))"
        )
        litellm = _cmd([str(litellm_python), "-c", script])
    else:
        litellm = "not installed"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": memory,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "spillway": f"{_version('spillway')}, git {commit}",
        "aiohttp": _version("aiohttp"),
        "uvloop": _version("uvloop"),
        "litellm": litellm,
        "nginx": _cmd(["nginx", "-v"]).removeprefix("nginx version: "),
        "wrk": _cmd(["wrk", "-v"]).split(" Copyright")[0],
    }


# --- derived figures -------------------------------------------------------------------------


def _rows(run: Run) -> list[Row]:
    """The results with added latency and TTFT overhead (candidate minus direct) filled in."""
    rows = [dict(r) for r in run["results"]]
    direct = next((r for r in rows if r["name"] == "direct" and r["status"].startswith("ok")), None)
    for row in rows:
        for added, own, base in (
            ("added_p50_ms", "p50_ms", "p50_ms"),
            ("added_p99_ms", "p99_ms", "p99_ms"),
            ("ttft_over_p50_ms", "ttft_p50_ms", "ttft_p50_ms"),
            ("ttft_over_p99_ms", "ttft_p99_ms", "ttft_p99_ms"),
        ):
            ok = direct is not None and row[own] is not None and direct[base] is not None
            row[added] = row[own] - direct[base] if ok else None  # type: ignore[index]
    return rows


def _by_name(rows: list[Row]) -> dict[str, Row]:
    return {r["name"]: r for r in rows if r["status"].startswith("ok")}


def _f(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None:
        return "n/a (a candidate did not run)"
    if denominator <= 0:
        return f"n/a (denominator {denominator:.3f} ≤ 0: within noise of direct)"
    return f"{numerator / denominator:.2f}x"


def ratios(run: Run) -> list[tuple[str, str, str]]:
    """(what, ratio, the figures it comes from)."""
    rows = _by_name(_rows(run))
    s1, s2, floor, lite, shared = (
        rows.get(n, {})
        for n in ("spillway-1w", "spillway-2w", "floor", "litellm", "spillway-redis")
    )

    def pair(a: Row, b: Row, key: str, unit: str, digits: int = 3) -> tuple[str, str]:
        x, y = a.get(key), b.get(key)
        return _ratio(x, y), f"{_f(x, digits)} / {_f(y, digits)} {unit}"

    out = [
        ("spillway 1w req/s ÷ floor req/s", *pair(s1, floor, "rps", "req/s", 0)),
        ("spillway 1w req/s ÷ LiteLLM (1 worker) req/s", *pair(s1, lite, "rps", "req/s", 0)),
        ("spillway 2w req/s ÷ LiteLLM (1 worker) req/s", *pair(s2, lite, "rps", "req/s", 0)),
        ("spillway 2w req/s ÷ spillway 1w req/s", *pair(s2, s1, "rps", "req/s", 0)),
        ("spillway 1w added p50 ÷ floor added p50 (c=1)", *pair(s1, floor, "added_p50_ms", "ms")),
        ("spillway 1w added p99 ÷ floor added p99 (c=1)", *pair(s1, floor, "added_p99_ms", "ms")),
        ("LiteLLM added p50 ÷ spillway 1w added p50 (c=1)", *pair(lite, s1, "added_p50_ms", "ms")),
        (
            "spillway 1w TTFT overhead p50 ÷ floor TTFT overhead p50",
            *pair(s1, floor, "ttft_over_p50_ms", "ms"),
        ),
        (
            "spillway 1w TTFT overhead p99 ÷ floor TTFT overhead p99",
            *pair(s1, floor, "ttft_over_p99_ms", "ms"),
        ),
        ("spillway 1w + Redis req/s ÷ spillway 1w req/s", *pair(shared, s1, "rps", "req/s", 0)),
        ("spillway 1w + Redis req/s ÷ floor req/s", *pair(shared, floor, "rps", "req/s", 0)),
        _redis_added_p50(shared, s1),
    ]
    hit = rows.get("spillway-hit", {})
    if hit.get("p50_ms") is None:
        out.append(("spillway exact cache hit p50, end to end (c=1)", "n/a", "did not run"))
    else:
        verdict = "within" if hit["p50_ms"] <= HIT_P50_TARGET_MS else "OVER"
        out.append(
            (
                "spillway exact cache hit p50, end to end (c=1)",
                f"{hit['p50_ms']:.3f} ms ({verdict} the {HIT_P50_TARGET_MS:g} ms target)",
                f"p99 {hit['p99_ms']:.3f} ms; {hit['rps']:.0f} req/s at c=64",
            )
        )
    for name, row in (("spillway 1w", s1), ("spillway 2w", s2)):
        rss = row.get("rss_mb")
        if rss is None:
            out.append((f"{name} RSS ÷ {RSS_BUDGET_MB:.0f} MB budget", "n/a", "did not run"))
        else:
            verdict = "within" if rss <= RSS_BUDGET_MB else "OVER"
            detail = f"{rss:.0f} MB RSS, PSS {row['pss_mb']:.0f} MB, processes: {row['processes']}"
            out.append(
                (
                    f"{name} RSS ÷ {RSS_BUDGET_MB:.0f} MB budget",
                    f"{rss / RSS_BUDGET_MB:.2f} ({verdict})",
                    detail,
                )
            )
    return out


def _redis_added_p50(shared: Row, alone: Row) -> tuple[str, str, str]:
    """What shared state adds to a request's p50 at c=1 (target: at most 0.3 ms)."""
    what = "what [state] redis_url adds to p50 (c=1)"
    x, y = shared.get("p50_ms"), alone.get("p50_ms")
    if x is None or y is None:
        return what, "n/a", "a candidate did not run"
    verdict = "within" if x - y <= REDIS_P50_TARGET_MS else "OVER"
    detail = f"{_f(x)} - {_f(y)} ms"
    return what, f"{x - y:+.3f} ms ({verdict} the {REDIS_P50_TARGET_MS:g} ms target)", detail


# --- text ------------------------------------------------------------------------------------

HEADER = (
    "| candidate | p50 c=1 (ms) | p99 c=1 (ms) | added p50 (ms) | added p99 (ms) | req/s c=64 "
    "| TTFT p50 (ms) | TTFT overhead p50 (ms) | TTFT overhead p99 (ms) | RSS (MB) | start (s) "
    "| status |\n"
    "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"
)


def table(run: Run) -> str:
    lines = [HEADER]
    for r in _rows(run):
        direct = r["name"] == "direct"
        lines.append(
            "| "
            + " | ".join(
                [
                    r["label"],
                    _f(r["p50_ms"]),
                    _f(r["p99_ms"]),
                    "(baseline)" if direct else _f(r["added_p50_ms"]),
                    "(baseline)" if direct else _f(r["added_p99_ms"]),
                    _f(r["rps"], 0),
                    _f(r["ttft_p50_ms"]),
                    "(baseline)" if direct else _f(r["ttft_over_p50_ms"]),
                    "(baseline)" if direct else _f(r["ttft_over_p99_ms"]),
                    _f(r["rss_mb"], 0),
                    _f(r["start_s"], 1),
                    r["status"].replace("|", "/"),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def ratios_text(run: Run) -> str:
    return "\n".join(f"- {what}: **{value}** ({detail})" for what, value, detail in ratios(run))


def markdown(run: Run) -> str:
    s = run["settings"]
    info = run["machine"]
    rows = _rows(run)
    commands = "\n".join(f"- {r['label']}: `{r['command']}`" for r in rows if r["command"])
    failures = [r for r in rows if not r["status"].startswith("ok")]
    failure_text = ""
    if failures:
        parts = []
        for r in failures:
            tail = f"\n\n```\n{r['log_tail']}\n```" if r["log_tail"] else ""
            parts.append(f"- **{r['label']}**: {r['status']}{tail}")
        failure_text = "\n## Failed or skipped\n\n" + "\n".join(parts) + "\n"
    extra = "\n".join(
        f"| {r['label']} | {_f(r['c64_p50_ms'])} | {_f(r['c64_p99_ms'])} | {_f(r['ttft_p99_ms'])} "
        f"| {_f(r['pss_mb'], 0)} | {r['processes'] if r['processes'] is not None else '—'} "
        f"| {_f(r['other_cpu_pct'], 0)} "
        f"| {', '.join(_f(x['p99_ms']) for x in r['latency_runs']) or '—'} |"
        for r in rows
    )
    machine = "\n".join(f"| {k} | {v} |" for k, v in info.items())
    is_smoke = bool(s["smoke"])
    smoke = " (**smoke run: short durations, figures are rough**)" if is_smoke else ""
    command = "bench/run --smoke" if is_smoke else "bench/run"
    busy = run.get("cpu_busy_before", 0.0)
    during = max((r["other_cpu_pct"] or 0.0 for r in rows), default=0.0)
    noisy = (
        f"\n**Warning:** processes outside the benchmark used up to {max(busy, during):.0f}% of "
        "the CPUs (just before the run, or while a candidate was measured: see `other CPU` "
        "below); the figures are noisier than on a quiet machine.\n"
        if max(busy, during) > NOISY_PCT
        else ""
    )
    more_header = (
        "| candidate | c=64 p50 (ms) | c=64 p99 (ms) | TTFT p99 (ms) | PSS (MB) | processes "
        "| other CPU (%) | p99 of each c=1 run (ms) |"
    )
    return f"""# spillway benchmark{smoke}

{run["date"]}, `{command}`, took {run["duration_s"]:.0f} s.
Everything ran on this one machine, side by side: the fixed-reply upstream (nginx `return 200`),
the load generator (wrk, and `bench/ttft.py` for streams) and one candidate at a time.
{noisy}
{table(run)}

Added latency and TTFT overhead are the candidate's figure minus direct's. p50/p99 at c=1:
`wrk -t1 -c1 -d{s["seconds"]:g}s`, mean of {s["latency_runs"]} run(s). req/s: `wrk -t2 -c64
-d{s["seconds"]:g}s`. TTFT: {s["ttft_n"]} sequential streams on one kept-alive connection, time
from sending the request to the first SSE `data:` line. RSS: sum of VmRSS over the candidate's
process tree after its run (for direct: nginx's master and worker). Other CPU: the share of
all CPUs that processes outside the benchmark used while the candidate was measured.

## Ratios

{ratios_text(run)}

## More figures

{more_header}
|---|--:|--:|--:|--:|--:|--:|---|
{extra}
{failure_text}
## Machine

| | |
|---|---|
{machine}

## Commands

- upstream: nginx (1 worker, access log off) from `bench/nginx.conf.template`; chat completion
  JSON at `/v1/chat/completions`, the same answer as SSE (7 events with usage, then `[DONE]`) at
  `/sse/v1/chat/completions`, both `return 200`
{commands}
- wrk script: `bench/chat.lua` (a 2-message chat body, `Authorization: Bearer` on every request)

Settings: {", ".join(f"{k}={v}" for k, v in s.items() if k != "out_dir")}.
"""


# --- chart -----------------------------------------------------------------------------------


LOG_FLOOR_MS = 0.01  # bars at or below zero (within noise of direct) are drawn this high


def chart(run: Run, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = [r for r in _rows(run) if r["status"].startswith("ok")]
    proxies = [r for r in rows if r["name"] != "direct"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.4))
    colours = {
        "direct": "#9e9e9e",
        "spillway-1w": "#1f77b4",
        "spillway-redis": "#17becf",
        "spillway-2w": "#6baed6",
        "spillway-hit": "#9467bd",
        "litellm": "#d62728",
        "floor": "#2ca02c",
    }

    def colour(r: Row) -> str:
        return colours.get(r["name"], "#555555")

    def short(r: Row) -> str:
        return str(r["label"]).replace(", ", "\n").replace(" (", "\n(")

    ax = axes[0]
    bars = ax.bar(
        [short(r) for r in rows], [r["rps"] for r in rows], color=[colour(r) for r in rows]
    )
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_title("requests/s at concurrency 64 (higher is better)", fontsize=10)
    ax.set_yscale("log")
    ax.set_ylabel("req/s (log scale)")

    panels = (
        ("added_p50_ms", "added_p99_ms", "added latency at concurrency 1"),
        ("ttft_over_p50_ms", "ttft_over_p99_ms", "time-to-first-token overhead, streams"),
    )
    for ax, (p50, p99, title) in zip(axes[1:], panels, strict=True):
        xs = list(range(len(proxies)))
        width = 0.38
        for offset, key, alpha, hatch in ((-width / 2, p50, 1.0, ""), (width / 2, p99, 0.45, "//")):
            values = [r[key] for r in proxies]
            bars = ax.bar(
                [x + offset for x in xs],
                [max(v or 0.0, LOG_FLOOR_MS) for v in values],
                width,
                color=[colour(r) for r in proxies],
                alpha=alpha,
                hatch=hatch,
            )
            labels = ["≤0" if v is None or v <= 0 else f"{v:.2f}" for v in values]
            ax.bar_label(bars, labels=labels, fontsize=7)
        ax.set_xticks(xs, [short(r) for r in proxies])
        ax.set_yscale("log")
        ax.set_title(f"{title}, minus direct (lower is better)", fontsize=10)
        ax.set_ylabel("ms (log scale)")
        ax.legend(
            handles=[
                Patch(facecolor="#777777", label="p50"),
                Patch(facecolor="#777777", alpha=0.45, hatch="//", label="p99"),
            ],
            fontsize=8,
        )
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    smoke = ", SMOKE RUN (short, rough)" if run["settings"]["smoke"] else ""
    fig.suptitle(
        f"spillway benchmark, {run['date']}, {run['machine']['nproc']} CPUs, "
        f"{run['machine']['cpu']}{smoke}",
        fontsize=11,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
