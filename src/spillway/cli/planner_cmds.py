"""``spillway roi`` and ``spillway plan``: the planner as rich tables, JSON or a PNG.

How both compute, every default and its source: docs/planner.md. Prices: docs/pricing.md.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console
from rich.table import Table

from spillway.cli.common import require_charts
from spillway.errors import ConfigError
from spillway.planner import roi as roi_calc
from spillway.planner import sizing
from spillway.planner.profiles import HardwareProfile, ModelProfile, ProfileBook, load_book
from spillway.planner.profiles import parse_count as _parse_count
from spillway.prices import LIST_PRICES, Exchange, Price

CONFIG_ERROR_EXIT = 2
Callback = Callable[[click.Context, click.Parameter, Any], Any]


def _number(*, share: bool = False, positive: bool = False) -> Callback:
    """A click callback: text to a finite, non-negative Decimal; a share is 0..1 or 0%..100%."""

    def convert(ctx: click.Context, param: click.Parameter, value: Any) -> Decimal | None:
        if value is None:
            return None
        text = str(value).strip()
        percent = share and text.endswith("%")
        try:
            number = Decimal(text.removesuffix("%")) / (100 if percent else 1)
        except InvalidOperation:
            raise click.BadParameter(f"{value!r} is not a number") from None
        if not number.is_finite() or number < 0 or (positive and number == 0):
            raise click.BadParameter(f"{value!r} must be a finite number above zero")
        if share and number > 1:
            raise click.BadParameter(f"{value!r} must be between 0 and 1 (or 0% and 100%)")
        return number

    return convert


def _count(ctx: click.Context, param: click.Parameter, value: Any) -> int | None:
    """A click callback: 10M, 32B, 1e9 → int; a context length's k is 1,024 (32k = 32,768)."""
    try:
        binary = param.name == "context"
        return None if value is None else _parse_count(value, binary=binary)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


NUMBER, SHARE = _number(), _number(share=True)
POSITIVE, FRACTION = _number(positive=True), _number(share=True, positive=True)
POS_INT = click.IntRange(min=1)


format_option = click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table"
)
profiles_option = click.option(
    "--profiles",
    "profiles_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML file adding or replacing [hardware.NAME], [accelerators.NAME], [models.NAME].",
)


def _book(command: str, path: Path | None) -> ProfileBook:
    try:
        return load_book(path)
    except ConfigError as exc:
        click.echo(f"spillway {command}: invalid profiles file: {exc.message}", err=True)
        sys.exit(CONFIG_ERROR_EXIT)


def _json(data: Any) -> str:
    def default(value: Any) -> Any:
        if isinstance(value, Decimal):
            return str(value)
        raise TypeError

    return orjson.dumps(data, default=default, option=orjson.OPT_INDENT_2).decode()


def _table(title: str, columns: tuple[str, ...], left: int = 1) -> Table:
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i < left else "right")
    return table


def _money(amount: Decimal) -> str:
    return f"{amount.quantize(roi_calc.CENT):,}"


@click.command("roi", context_settings={"show_default": True})
@click.option(
    "--tokens-per-month",
    default="10M",
    callback=_count,
    help="Tokens a month: 10M, 1e9, 250000000.",
)
@click.option(
    "--input-share", default="0", callback=SHARE, help="Part of the tokens that is input."
)
@click.option("--cache-hit-rate", default="0", callback=SHARE, help="0.7 or 70%.")
@click.option("--provider", "providers", multiple=True, type=click.Choice(sorted(LIST_PRICES)))
@click.option("--profile", "profile_names", multiple=True, help="Hardware profile (default: all).")
@click.option("--amortisation-months", type=POS_INT, default=roi_calc.DEFAULT_AMORTISATION_MONTHS)
@click.option("--power-kw", callback=NUMBER, help="Average draw, replacing the profiles' own.")
@click.option(
    "--electricity-per-kwh",
    default=str(roi_calc.DEFAULT_ELECTRICITY_PER_KWH),
    callback=NUMBER,
    help="CNY per kWh.",
)
@click.option("--ops-per-month", callback=NUMBER, help="CNY a month, replacing the profiles' own.")
@click.option(
    "--max-utilisation",
    default=str(roi_calc.DEFAULT_MAX_UTILISATION),
    callback=FRACTION,
    help="Share of peak throughput sustained over a month.",
)
@click.option("--cny-per-usd", default=str(Exchange().cny_per_usd), callback=POSITIVE)
@click.option("--currency", type=click.Choice(["USD", "CNY"]), default="USD")
@format_option
@click.option(
    "--png",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Chart to write (needs the charts extra: matplotlib).",
)
@profiles_option
def roi(
    tokens_per_month: int,
    input_share: Decimal,
    cache_hit_rate: Decimal,
    providers: tuple[str, ...],
    profile_names: tuple[str, ...],
    amortisation_months: int,
    power_kw: Decimal | None,
    electricity_per_kwh: Decimal,
    ops_per_month: Decimal | None,
    max_utilisation: Decimal,
    cny_per_usd: Decimal,
    currency: str,
    fmt: str,
    png: Path | None,
    profiles_path: Path | None,
) -> None:
    """Compare private hardware with the cloud at a monthly token volume.

    Monthly cost each way, the break-even month, and whether the hardware can serve the
    volume at all. How it computes and every default: docs/planner.md.
    """
    if png is not None:
        require_charts("--png")
    book = _book("roi", profiles_path)
    for name in profile_names:
        if name not in book.hardware:
            known = ", ".join(book.hardware)
            raise click.BadParameter(
                f"unknown profile {name!r} (known: {known})", param_hint="--profile"
            )
    profiles = [book.hardware[n] for n in profile_names or book.hardware]
    prices = {name: LIST_PRICES[name] for name in providers or LIST_PRICES}
    workload = roi_calc.Workload(tokens_per_month, cache_hit_rate, input_share)
    assumptions = roi_calc.Assumptions(
        amortisation_months,
        electricity_per_kwh,
        power_kw,
        ops_per_month,
        max_utilisation,
        Exchange(cny_per_usd),
        "CNY" if currency == "CNY" else "USD",
    )
    report = roi_calc.roi_report(workload, profiles, prices, assumptions)
    if fmt == "json":
        click.echo(_json(roi_calc.report_data(report, prices)))
    else:
        _print_roi(report, prices)
    if png is not None:
        _roi_chart(png, report, profiles)
        click.echo(f"wrote chart to {png}", err=True)


def _roi_chart(path: Path, report: roi_calc.RoiReport, profiles: list[HardwareProfile]) -> None:
    from spillway.planner.charts import save_cost_chart, volume_range  # matplotlib is slow

    w, a = report.workload, report.assumptions
    volumes = volume_range(w.tokens_per_month)
    curves = roi_calc.cost_curves(volumes, w, profiles, LIST_PRICES, a)
    cloud = {name: curves[name] for name in LIST_PRICES}
    private = {p.name: curves[p.name] for p in profiles}
    subtitle = (
        f"cache hit rate {w.cache_hit_rate:.0%}, input share {w.input_share:.0%}, "
        f"{a.amortisation_months}-month amortisation, {a.exchange.cny_per_usd} CNY/USD"
    )
    save_cost_chart(
        path,
        volumes,
        cloud,
        private,
        volume=w.tokens_per_month,
        currency=a.currency,
        subtitle=subtitle,
    )


def _print_roi(report: roi_calc.RoiReport, prices: Mapping[str, Price]) -> None:
    w, a = report.workload, report.assumptions
    console = Console(soft_wrap=False)
    priced = f"{w.input_share:.0%} input" if w.input_share else "all priced as output"
    click.echo(
        f"{w.tokens_per_month:,} tokens a month ({priced}), cache hit rate "
        f"{w.cache_hit_rate:.0%}: {w.served_output_tokens():,} output tokens to generate. "
        f"Amounts in {a.currency} at {a.exchange.cny_per_usd} CNY per USD."
    )
    cloud = _table(
        f"Cloud, per month ({a.currency})", ("provider", "input/Mtok", "output/Mtok", "monthly")
    )
    for name, cost in report.cloud.items():
        p = prices[name]
        cloud.add_row(
            name,
            f"{p.input_per_mtok} {p.currency}",
            f"{p.output_per_mtok} {p.currency}",
            _money(cost),
        )
    title = (
        f"Private hardware, per month ({a.currency}, {a.amortisation_months}-month amortisation)"
    )
    columns = "profile|hardware|boxes|capacity tok/mo|price|amortised|power|ops|total"
    private = _table(title, tuple(columns.split("|")), left=2)
    for c in report.private:
        amounts = (c.hardware, c.amortised, c.power, c.ops, c.monthly)
        private.add_row(
            c.profile.name,
            c.profile.summary,
            str(c.units),
            f"{c.capacity:,}",
            *map(_money, amounts),
        )
    console.print(cloud)
    console.print(private)
    console.print(_break_even_table(report))
    for note in report.notes:
        click.echo(note)


def _break_even_table(report: roi_calc.RoiReport) -> Table:
    columns = [f"{name}\n{_money(cost)}/mo" for name, cost in report.cloud.items()]
    table = _table("Break-even month (hardware paid up front)", ("profile", "private/mo", *columns))
    for cost in report.private:
        cells = []
        for c in (c for c in report.comparisons if c.private is cost):
            month = c.break_even_month
            late = "" if c.pays_off else " (too late)"
            cells.append("never" if month is None else f"month {month}{late}")
        table.add_row(cost.profile.name, _money(cost.monthly), *cells)
    return table


@click.command("plan", context_settings={"show_default": True})
@click.option("--model", "model_key", help="A known model (see --list).")
@click.option("--params", callback=_count, help="Parameter count: 32B, 32e9, 7000000000.")
@click.option("--layers", type=POS_INT, help="num_hidden_layers in config.json.")
@click.option("--kv-heads", type=POS_INT, help="num_key_value_heads (multi_query_group_num).")
@click.option("--head-dim", type=POS_INT, help="head_dim (kv_channels).")
@click.option("--quantization", type=click.Choice(list(sizing.QUANTIZATIONS)), default="bf16")
@click.option("--kv-dtype", type=click.Choice(list(sizing.KV_DTYPES)), default="bf16")
@click.option("--context", default="8192", callback=_count, help="Tokens per sequence (32k).")
@click.option("--concurrency", type=POS_INT, default=1, help="Sequences held at once.")
@click.option("--accelerator", default="ascend-910b", help="See --list.")
@click.option("--count", type=POS_INT, default=1, help="How many accelerators.")
@click.option(
    "--memory-utilisation",
    default=str(sizing.DEFAULT_MEMORY_UTILISATION),
    callback=FRACTION,
    help="Share of each card's memory the engine may use.",
)
@click.option("--list", "list_only", is_flag=True, help="List known models and accelerators.")
@format_option
@profiles_option
def plan(
    model_key: str | None,
    params: int | None,
    layers: int | None,
    kv_heads: int | None,
    head_dim: int | None,
    quantization: str,
    kv_dtype: str,
    context: int,
    concurrency: int,
    accelerator: str,
    count: int,
    memory_utilisation: Decimal,
    list_only: bool,
    fmt: str,
    profiles_path: Path | None,
) -> None:
    """Does a model fit? Weights plus KV cache against accelerator memory.

    Gives a verdict, the lightest quantization that fits and the largest concurrency that
    fits. How it computes and where every number comes from: docs/planner.md.
    """
    book = _book("plan", profiles_path)
    if list_only:
        _print_catalogue(book, fmt)
        return
    if model_key is None and params is None:
        raise click.UsageError("give --model NAME or --params COUNT (see --list)")
    for kind, key, known in (
        ("model", model_key, book.models),
        ("accelerator", accelerator, book.accelerators),
    ):
        if key is not None and key not in known:
            raise click.BadParameter(
                f"unknown {kind} {key!r} (known: {', '.join(known)})", param_hint=f"--{kind}"
            )
    if context < 1:
        raise click.BadParameter("must be at least 1", param_hint="--context")
    base = book.models[model_key] if model_key else ModelProfile("custom", "", params or 0)
    model = base.overridden(params, layers, kv_heads, head_dim)
    if not model.name:
        model = ModelProfile("custom", f"{model.params / 1e9:g}B-parameter model", *_shape(model))
    deployment = sizing.Deployment(
        model,
        book.accelerators[accelerator],
        count,
        quantization,
        context,
        concurrency,
        kv_dtype,
        memory_utilisation,
    )
    report = sizing.size(deployment)
    if fmt == "json":
        click.echo(_json(sizing.report_data(report)))
    else:
        _print_plan(report)


def _shape(m: ModelProfile) -> tuple[int, int | None, int | None, int | None]:
    return m.params, m.layers, m.kv_heads, m.head_dim


def _print_plan(report: sizing.SizingReport) -> None:
    d, asked, gib = report.deployment, report.asked, sizing.gib
    click.echo(report.verdict)
    title = f"{d.model.name} on {d.count} x {d.accelerator.name}, GiB"
    columns = f"quantization|weights|KV cache|total|usable|fits|max concurrency @ {d.context:,}"
    table = _table(title, (*columns.split("|"), "cards needed"))
    for f in report.by_quantization:
        kv = "?" if f.kv_cache is None else gib(f.kv_cache)
        most = "?" if f.max_concurrency is None else str(f.max_concurrency)
        table.add_row(
            f.quantization,
            gib(f.weights),
            kv,
            gib(f.required),
            gib(f.usable),
            "yes" if f.fits else "no",
            most,
            str(f.cards_needed),
        )
    Console(soft_wrap=False).print(table)
    lightest = report.lightest_fitting or f"none, on {d.count} card(s)"
    click.echo(f"Lightest quantization that fits: {lightest}.")
    if asked.max_concurrency is not None:
        click.echo(
            f"Largest concurrency that fits at {asked.quantization} with {d.context:,} tokens "
            f"of context: {asked.max_concurrency}."
        )


def _print_catalogue(book: ProfileBook, fmt: str) -> None:
    models = {
        k: dict(zip(("params", "layers", "kv_heads", "head_dim"), _shape(m), strict=True))
        | {"name": m.name}
        for k, m in book.models.items()
    }
    accelerators = {
        k: {"name": a.name, "memory_gib": a.memory_gib, "tdp_w": a.tdp_w, "source": a.source}
        for k, a in book.accelerators.items()
    }
    if fmt == "json":
        click.echo(_json({"models": models, "accelerators": accelerators}))
        return
    console = Console(soft_wrap=False)
    table = _table("models", ("key", "name", "params", "layers", "KV heads", "head dim"), 2)
    for k, m in book.models.items():
        table.add_row(k, m.name, f"{m.params / 1e9:.2f}B", *(str(v) for v in _shape(m)[1:]))
    console.print(table)
    table = _table("accelerators", ("key", "name", "memory GiB", "TDP W", "source"), 2)
    for k, a in book.accelerators.items():
        table.add_row(k, a.name, str(a.memory_gib), str(a.tdp_w or "?"), a.source)
    console.print(table)
