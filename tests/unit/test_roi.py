"""roi arithmetic, checked against hand-computed figures (exact Decimal equality)."""

from decimal import Decimal
from pathlib import Path

import pytest

from spillway.errors import ConfigError
from spillway.planner.profiles import HARDWARE, HardwareProfile, load_book
from spillway.planner.roi import (
    NEVER_PAYS_OFF,
    SECONDS_PER_MONTH,
    Assumptions,
    Workload,
    break_even_month,
    capacity_per_month,
    cloud_monthly_cost,
    compare,
    cost_curves,
    private_cost,
    report_data,
    roi_report,
    units_needed,
)
from spillway.prices import LIST_PRICES, Exchange, Price

D = Decimal
TEN_MILLION = 10_000_000


# --- the seed figures -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "expected"),
    [("gpt-4.1", "80.00"), ("deepseek-v3.2", "4.20"), ("holysheep", "3.50")],
)
def test_seed_figures_ten_million_output_tokens(provider: str, expected: str) -> None:
    cost = cloud_monthly_cost(Workload(TEN_MILLION), LIST_PRICES[provider])
    assert cost == D(expected)


def test_seed_figure_holysheep_with_a_seventy_percent_cache_hit_rate() -> None:
    assert cloud_monthly_cost(Workload(TEN_MILLION, D("0.7")), LIST_PRICES["holysheep"]) == D(
        "1.05"
    )


def test_the_other_list_prices_at_ten_million_output_tokens() -> None:
    w = Workload(TEN_MILLION)
    assert cloud_monthly_cost(w, LIST_PRICES["claude-sonnet-4.5"]) == D("150")
    assert cloud_monthly_cost(w, LIST_PRICES["gemini-2.5-flash"]) == D("25")


def test_input_share_blends_input_and_output_prices() -> None:
    # 5M input x $2 + 5M output x $8 = $10 + $40
    assert cloud_monthly_cost(
        Workload(TEN_MILLION, input_share=D("0.5")), LIST_PRICES["gpt-4.1"]
    ) == D("50")
    # 75% input, 40% cache hits: 6M reach the cloud, 4.5M in x $0.28 + 1.5M out x $0.42
    w = Workload(TEN_MILLION, cache_hit_rate=D("0.4"), input_share=D("0.75"))
    assert cloud_monthly_cost(w, LIST_PRICES["deepseek-v3.2"]) == D("1.26") + D("0.63")


def test_cloud_cost_keeps_a_millionth_of_a_unit() -> None:
    assert cloud_monthly_cost(Workload(1), LIST_PRICES["holysheep"]) == D("0.000000")
    assert cloud_monthly_cost(Workload(3), LIST_PRICES["gpt-4.1"]) == D("0.000024")


def test_served_output_tokens_after_cache_and_input_share() -> None:
    assert Workload(TEN_MILLION, D("0.7")).served_output_tokens() == 3_000_000
    assert Workload(TEN_MILLION, D("0.7"), D("0.25")).served_output_tokens() == 2_250_000
    assert Workload(0).served_output_tokens() == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tokens_per_month": -1},
        {"tokens_per_month": 1, "cache_hit_rate": D("1.01")},
        {"tokens_per_month": 1, "input_share": D("-0.1")},
    ],
)
def test_workload_rejects_impossible_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Workload(**kwargs)  # type: ignore[arg-type]


def test_assumptions_reject_impossible_values() -> None:
    with pytest.raises(ValueError):
        Assumptions(amortisation_months=0)
    with pytest.raises(ValueError):
        Assumptions(max_utilisation=D(0))


# --- capacity ---------------------------------------------------------------------------------


def test_capacity_is_throughput_times_a_month_times_utilisation() -> None:
    assert SECONDS_PER_MONTH == 2_628_000
    assert capacity_per_month(D(30), D("0.6")) == 47_304_000
    assert capacity_per_month(D(120), D(1)) == 315_360_000
    assert capacity_per_month(D("0.5"), D("0.3")) == 394_200


def test_units_needed_rounds_up_and_is_at_least_one() -> None:
    assert units_needed(0, 100) == 1
    assert units_needed(100, 100) == 1
    assert units_needed(101, 100) == 2
    assert units_needed(1000, 100) == 10
    with pytest.raises(ValueError):
        units_needed(1, 0)


# --- break-even -------------------------------------------------------------------------------


def test_break_even_exact_and_rounded_up() -> None:
    # 1000 up front, 100/month running, cloud 300/month: 5 x 300 = 1000 + 5 x 100
    assert break_even_month(D(1000), D(100), D(300)) == 5
    # cloud 250: month 6 is 1500 vs 1600, month 7 is 1750 vs 1700
    assert break_even_month(D(1000), D(100), D(250)) == 7
    assert break_even_month(D(0), D(100), D(101)) == 1


def test_break_even_never_when_the_cloud_costs_no_more_than_running_the_box() -> None:
    assert break_even_month(D(1000), D(100), D(100)) is None
    assert break_even_month(D(1000), D(100), D(50)) is None


@pytest.mark.parametrize("upfront", [0, 1, 99, 1000, 12345])
@pytest.mark.parametrize(("running", "cloud"), [(0, 7), (10, 11), (3, 40), (100, 250)])
def test_break_even_matches_a_month_by_month_walk(upfront: int, running: int, cloud: int) -> None:
    month = 1
    while month * cloud < upfront + month * running:
        month += 1
    assert break_even_month(D(upfront), D(running), D(cloud)) == month


# --- private cost -----------------------------------------------------------------------------


def test_development_profile_monthly_cost_by_hand() -> None:
    cost = private_cost(HARDWARE["development"], TEN_MILLION, Assumptions())
    # ¥50,000 / 7.10 = $7,042.253521; / 36 months
    assert cost.hardware == D("7042.253521")
    assert cost.amortised == D("195.618153")
    # 0.8 kW x 730 h x ¥0.80 = ¥467.20 = $65.802817
    assert cost.power == D("65.802817")
    # ¥2,000 = $281.690141
    assert cost.ops == D("281.690141")
    assert cost.monthly == D("543.111111")
    assert cost.running == D("347.492958")
    assert (cost.units, cost.capacity_per_unit) == (1, 47_304_000)


def test_private_cost_in_cny_needs_no_conversion() -> None:
    cost = private_cost(HARDWARE["development"], 0, Assumptions(currency="CNY"))
    assert cost.hardware == D(50_000)
    assert cost.monthly == D("1388.888889") + D("467.2") + D(2000)


def test_overrides_replace_the_profile_power_ops_and_tariff() -> None:
    a = Assumptions(
        currency="CNY",
        power_kw=D(2),
        ops_per_month=D(0),
        electricity_per_kwh=D("0.5"),
        amortisation_months=50,
    )
    cost = private_cost(HARDWARE["development"], 0, a)
    assert (cost.amortised, cost.power, cost.ops) == (D(1000), D(730), D(0))


def test_private_cost_scales_to_the_boxes_the_volume_needs() -> None:
    one = private_cost(HARDWARE["development"], 0, Assumptions(currency="CNY"))
    three = private_cost(HARDWARE["development"], 100_000_000, Assumptions(currency="CNY"))
    assert three.units == 3  # 100M > 2 x 47,304,000
    assert three.hardware == 3 * one.hardware
    assert three.monthly == 3 * one.monthly
    assert three.capacity == 3 * 47_304_000


def test_exchange_rate_changes_the_usd_figures() -> None:
    cost = private_cost(HARDWARE["development"], 0, Assumptions(exchange=Exchange(D(5))))
    assert cost.hardware == D(10_000)


# --- comparisons and the honest notes ---------------------------------------------------------


def _box(price: int = 7_100, tps: int = 1_000) -> HardwareProfile:
    """A made-up box: ¥7,100 (= $1,000) up front, no running cost."""
    return HardwareProfile("box", "Box", "h100-80gb", 1, 64, D(tps), D(price), D(0), D(0))


def test_a_cheap_box_pays_off_in_the_hand_computed_month() -> None:
    # 12.5M output tokens on gpt-4.1 = $100/month; $1,000 up front, nothing to run: month 10
    c = compare(Workload(12_500_000), _box(), "gpt-4.1", LIST_PRICES["gpt-4.1"], Assumptions())
    assert c.cloud_monthly == D(100)
    assert c.break_even_month == 10
    assert c.pays_off
    assert c.monthly_saving == D(100) - D("27.777778")


def test_break_even_after_the_amortisation_period_does_not_pay_off() -> None:
    a = Assumptions(amortisation_months=6)
    c = compare(Workload(12_500_000), _box(), "gpt-4.1", LIST_PRICES["gpt-4.1"], a)
    assert c.break_even_month == 10
    assert not c.pays_off
    report = roi_report(Workload(12_500_000), [_box()], {"gpt-4.1": LIST_PRICES["gpt-4.1"]}, a)
    assert any("only in month 10, after the 6-month amortisation period" in n for n in report.notes)
    assert report.notes[-1] == NEVER_PAYS_OFF


def test_seed_volume_never_pays_off_and_says_so_plainly() -> None:
    report = roi_report(Workload(TEN_MILLION), HARDWARE.values(), LIST_PRICES, Assumptions())
    assert all(c.break_even_month is None for c in report.comparisons)
    assert len(report.comparisons) == 3 * len(LIST_PRICES)
    assert report.notes[-1] == NEVER_PAYS_OFF
    assert (
        "On cost alone, the cloud is cheaper at this volume; private hardware may still be "
        "justified for data sovereignty."
    ) in report.notes
    assert (
        "Development does not pay off against any of the listed cloud providers"
        in (report.notes[0])
    )


def test_no_never_pays_note_when_everything_pays_off() -> None:
    prices = {"gpt-4.1": LIST_PRICES["gpt-4.1"]}
    report = roi_report(Workload(12_500_000), [_box()], prices, Assumptions())
    assert report.notes == []


def test_mixed_results_name_the_providers_it_pays_off_against() -> None:
    report = roi_report(Workload(12_500_000), [_box()], LIST_PRICES, Assumptions())
    paying = {c.provider for c in report.comparisons if c.pays_off}
    assert paying == {"gpt-4.1", "claude-sonnet-4.5", "gemini-2.5-flash"}
    assert "claude-sonnet-4.5, gemini-2.5-flash, gpt-4.1" in report.notes[-2]
    assert report.notes[-1] == NEVER_PAYS_OFF


def test_capacity_check_says_when_one_box_cannot_serve_the_volume() -> None:
    report = roi_report(
        Workload(100_000_000), [HARDWARE["development"]], LIST_PRICES, Assumptions()
    )
    [cost] = report.private
    assert cost.units == 3
    assert report.notes[0].startswith("Development cannot serve this volume on one box")
    assert "47,304,000" in report.notes[0] and "3 boxes" in report.notes[0]


def test_cache_hits_shrink_what_the_hardware_must_serve() -> None:
    w = Workload(100_000_000, cache_hit_rate=D("0.6"))  # 40M to generate
    report = roi_report(w, [HARDWARE["development"]], LIST_PRICES, Assumptions())
    assert report.private[0].units == 1
    assert not any("cannot serve" in n for n in report.notes)


def test_roi_report_needs_a_provider() -> None:
    with pytest.raises(ValueError):
        roi_report(Workload(1), HARDWARE.values(), {}, Assumptions())


def test_report_data_rounds_money_to_cents() -> None:
    w = Workload(TEN_MILLION, D("0.7"))
    data = report_data(
        roi_report(w, [HARDWARE["development"]], LIST_PRICES, Assumptions()), LIST_PRICES
    )
    assert data["cloud"]["holysheep"]["monthly"] == D("1.05")  # type: ignore[index]
    assert data["private"][0]["monthly"] == D("543.11")  # type: ignore[index]
    assert data["workload"]["served_output_tokens"] == 3_000_000  # type: ignore[index]


def test_cost_curves_cloud_is_linear_and_private_steps_up() -> None:
    volumes = [10**6, 10**7, 10**8, 10**9]
    prices = {"gpt-4.1": LIST_PRICES["gpt-4.1"]}
    dev = HARDWARE["development"]
    curves = cost_curves(volumes, Workload(1), [dev], prices, Assumptions())
    assert curves["gpt-4.1"] == [D(8), D(80), D(800), D(8000)]
    monthly = private_cost(dev, 0, Assumptions()).monthly
    assert curves["Development"][:2] == [monthly, monthly]
    assert curves["Development"][2] == 3 * monthly  # 100M needs 3 boxes
    assert curves["Development"][3] == 22 * monthly  # 1B / 47,304,000 = 21.1


def test_non_usd_cloud_prices_are_converted() -> None:
    yuan = Price(D(2), D(8), "CNY")
    c = compare(Workload(TEN_MILLION), _box(), "cny-cloud", yuan, Assumptions())
    assert c.cloud_monthly == D("11.267606")  # ¥80 at 7.10


# --- hardware profiles from TOML -----------------------------------------------------------------


def test_profiles_file_adds_a_box_and_edits_a_built_in_one(tmp_path: Path) -> None:
    path = tmp_path / "profiles.toml"
    path.write_text(
        """
[hardware.edge]
name = "Edge box"
accelerator = "rtx-4090"
accelerator_count = 2
ram_gb = 128
tokens_per_second = 60
price = 40000
power_kw = 1.1
ops_per_month = 1500

[hardware.development]
power_kw = 0.65
"""
    )
    book = load_book(path)
    edge = book.hardware["edge"]
    assert edge.power_kw == D("1.1")  # the TOML float becomes the decimal it reads as
    assert (edge.price, edge.tokens_per_second, edge.currency) == (D(40000), D(60), "CNY")
    dev = book.hardware["development"]
    assert dev.power_kw == D("0.65")
    assert dev.price == HARDWARE["development"].price
    assert set(book.hardware) == {*HARDWARE, "edge"}


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[hardware.x]\nname='X'\nprice=-1", "hardware.x.accelerator"),
        ("[hardware.development]\nwatts = 3", "hardware.development.watts"),
        ("[hardware.development]\nprice = -5", "hardware.development.price"),
        ("[hardware.development]\ncurrency = 'EUR'", "hardware.development.currency"),
        ("[boxes.x]\nname='X'", "boxes"),
        ("hardware = 3", "hardware"),
    ],
)
def test_profiles_file_errors_name_the_setting(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_book(path)
    assert caught.value.path == where


def test_profiles_file_that_is_not_toml(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text("[hardware.x\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_book(path)


def test_chart_volumes_span_a_hundredth_to_a_hundred_times_the_volume() -> None:
    from spillway.planner.charts import volume_range

    volumes = volume_range(TEN_MILLION)
    assert volumes[0] == 100_000 and volumes[-1] == 10**10
    assert TEN_MILLION in volumes
    assert volumes == sorted(set(volumes))
    small = volume_range(0)
    assert small[0] == 1 and small[-1] == 10**10 and 0 not in small
