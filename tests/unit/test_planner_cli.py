"""``spillway roi`` and ``spillway plan`` through click's test runner: table, JSON and PNG."""

from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner, Result

from spillway.cli.main import cli
from spillway.planner.roi import NEVER_PAYS_OFF

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(*args: str) -> Result:
    # wide enough that rich never wraps a table cell the assertions look for
    return CliRunner().invoke(cli, list(args), env={"COLUMNS": "240"}, catch_exceptions=False)


def run_json(*args: str) -> Any:
    result = run(*args, "--format", "json")
    assert result.exit_code == 0, result.output
    return orjson.loads(result.stdout)


def test_both_commands_are_registered() -> None:
    assert {"roi", "plan"} <= set(cli.commands)  # type: ignore[attr-defined]


# --- roi ------------------------------------------------------------------------------------------


def test_roi_table_at_the_seed_volume() -> None:
    result = run("roi", "--tokens-per-month", "10M")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "10,000,000 tokens a month (all priced as output)" in out
    for figure in ("80.00", "150.00", "25.00", "4.20", "3.50", "543.11"):
        assert figure in out
    assert "never" in out
    assert NEVER_PAYS_OFF in out


def test_roi_json_reproduces_the_seed_figures() -> None:
    data = run_json("roi", "--tokens-per-month", "1e7")
    monthly = {name: c["monthly"] for name, c in data["cloud"].items()}
    assert monthly["gpt-4.1"] == "80.00"
    assert monthly["deepseek-v3.2"] == "4.20"
    assert monthly["holysheep"] == "3.50"
    assert NEVER_PAYS_OFF in data["notes"]
    assert all(c["break_even_month"] is None for c in data["comparisons"])


def test_roi_json_with_a_seventy_percent_cache_hit_rate() -> None:
    data = run_json("roi", "--cache-hit-rate", "70%", "--provider", "holysheep")
    assert list(data["cloud"]) == ["holysheep"]
    assert data["cloud"]["holysheep"]["monthly"] == "1.05"
    assert data["workload"]["served_output_tokens"] == 3_000_000
    assert data["workload"]["cache_hit_rate"] == "0.7"


def test_roi_one_profile_in_cny_with_overrides() -> None:
    data = run_json(
        "roi",
        "--profile",
        "development",
        "--currency",
        "CNY",
        "--power-kw",
        "1",
        "--electricity-per-kwh",
        "1",
        "--ops-per-month",
        "0",
        "--amortisation-months",
        "50",
    )
    [private] = data["private"]
    assert private["amortised_monthly"] == "1000.00"
    assert private["power_monthly"] == "730.00"
    assert private["ops_monthly"] == "0.00"
    assert private["monthly"] == "1730.00"


def test_roi_break_even_at_a_high_volume_against_claude() -> None:
    # 400M output tokens: Claude $6,000/month; Production Large runs $3,392.68 a month after
    # paying $112,676.06 up front: 112,676.06 / 2,607.32 = 43.2, so month 44 (> 36: too late)
    data = run_json(
        "roi",
        "--tokens-per-month",
        "400M",
        "--profile",
        "production-large",
        "--provider",
        "claude-sonnet-4.5",
    )
    [comparison] = data["comparisons"]
    assert comparison["break_even_month"] == 44
    assert comparison["pays_off"] is False
    assert "only in month 44, after the 36-month amortisation period" in "\n".join(data["notes"])
    longer = run_json(
        "roi",
        "--tokens-per-month",
        "400M",
        "--profile",
        "production-large",
        "--provider",
        "claude-sonnet-4.5",
        "--amortisation-months",
        "60",
    )
    assert longer["comparisons"][0]["pays_off"] is True
    assert longer["notes"] == []


def test_roi_says_when_the_hardware_cannot_serve_the_volume() -> None:
    result = run("roi", "--tokens-per-month", "1B", "--profile", "development")
    assert result.exit_code == 0
    assert "Development cannot serve this volume on one box" in result.stdout
    assert "It would take 22 boxes" in result.stdout


def test_roi_png_is_written(tmp_path: Path) -> None:
    path = tmp_path / "roi.png"
    result = run("roi", "--tokens-per-month", "50M", "--cache-hit-rate", "0.3", "--png", str(path))
    assert result.exit_code == 0, result.output
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert path.stat().st_size > 10_000
    assert f"wrote chart to {path}" in result.stderr


def test_roi_png_with_json_output(tmp_path: Path) -> None:
    path = tmp_path / "chart.png"
    data = run_json("roi", "--png", str(path), "--profile", "development")
    assert data["private"][0]["profile"] == "development"
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_roi_custom_profiles_file(tmp_path: Path) -> None:
    path = tmp_path / "profiles.toml"
    path.write_text(
        '[hardware.cheap]\nname = "Cheap"\naccelerator = "rtx-4090"\ntokens_per_second = 100\n'
        "price = 7100\npower_kw = 0\nops_per_month = 0\n"
    )
    data = run_json("roi", "--profiles", str(path), "--profile", "cheap", "--provider", "gpt-4.1")
    # $1,000 up front, nothing to run, $80 a month of GPT-4.1: month 13
    assert data["comparisons"][0]["break_even_month"] == 13
    assert data["comparisons"][0]["pays_off"] is True


def test_roi_invalid_profiles_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "profiles.toml"
    path.write_text("[hardware.development]\nwatts = 1\n")
    result = run("roi", "--profiles", str(path))
    assert result.exit_code == 2
    assert "invalid profiles file: hardware.development.watts: unknown setting" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("--profile", "mainframe"),
        ("--provider", "nobody"),
        ("--cache-hit-rate", "1.5"),
        ("--cache-hit-rate", "lots"),
        ("--tokens-per-month", "many"),
        ("--max-utilisation", "0"),
        ("--cny-per-usd", "0"),
        ("--power-kw", "-1"),
    ],
)
def test_roi_rejects_bad_options(args: tuple[str, ...]) -> None:
    result = run("roi", *args)
    assert result.exit_code == 2
    assert "Error" in result.stderr


# --- plan -----------------------------------------------------------------------------------------


def test_plan_table_for_qwen_32b_on_one_h100_at_32k() -> None:
    result = run("plan", "--model", "qwen2.5-32b", "--accelerator", "h100-80gb", "--context", "32k")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith("Does not fit. Qwen2.5-32B at bf16 with 32,768-token context x 1")
    assert "Lightest quantization that fits: int8." in out
    assert "Largest concurrency that fits at bf16 with 32,768 tokens of context: 0." in out
    assert "max concurrency @ 32,768" in out


def test_plan_json_int4_fits() -> None:
    data = run_json(
        "plan",
        "--model",
        "qwen2.5-32b",
        "--accelerator",
        "h100-80gb",
        "--context",
        "32768",
        "--quantization",
        "int4",
    )
    assert data["fits"] is True
    assert data["max_concurrency"] == 6
    assert data["lightest_fitting_quantization"] == "int8"
    assert data["verdict"].startswith("Fits.")


def test_plan_with_a_bare_parameter_count() -> None:
    data = run_json("plan", "--params", "32B", "--accelerator", "a100-40gb")
    assert data["model"]["params"] == 32_000_000_000
    assert data["kv_cache_bytes"] is None
    assert data["fits"] is False
    assert data["lightest_fitting_quantization"] == "int8"
    assert "32B-parameter model" in data["verdict"]


def test_plan_with_a_parameter_count_and_a_shape() -> None:
    data = run_json(
        "plan",
        "--params",
        "7e9",
        "--layers",
        "32",
        "--kv-heads",
        "8",
        "--head-dim",
        "128",
        "--accelerator",
        "rtx-4090",
        "--concurrency",
        "4",
    )
    assert data["kv_cache_bytes"] == 2 * 32 * 8 * 128 * 2 * 8192 * 4
    assert data["fits"] is True


def test_plan_llama_70b_on_eight_910b() -> None:
    data = run_json("plan", "--model", "llama-3-70b", "--count", "8")
    assert data["accelerator"]["key"] == "ascend-910b"
    assert data["fits"] is True
    assert data["max_concurrency"] == 126


def test_plan_list() -> None:
    result = run("plan", "--list")
    assert result.exit_code == 0
    for key in ("glm-4-9b", "glm-4-32b", "qwen2.5-32b", "llama-3-70b", "ascend-910c", "mlu590"):
        assert key in result.stdout
    data = run_json("plan", "--list")
    assert data["accelerators"]["h200"]["memory_gib"] == "141"
    assert data["models"]["qwen2.5-32b"]["kv_heads"] == 8


def test_plan_custom_model_from_profiles_file(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        '[models.tiny]\nparams = "1B"\nlayers = 16\nkv_heads = 8\nhead_dim = 64\n'
        '[accelerators.edge]\nname = "Edge"\nmemory_gib = 8\n'
    )
    data = run_json("plan", "--profiles", str(path), "--model", "tiny", "--accelerator", "edge")
    assert data["model"]["name"] == "tiny"
    assert data["fits"] is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "give --model NAME or --params COUNT"),
        (("--model", "gpt-9"), "unknown model 'gpt-9'"),
        (("--model", "glm-4-9b", "--accelerator", "abacus"), "unknown accelerator 'abacus'"),
        (("--params", "big"), "expected a count"),
        (("--model", "glm-4-9b", "--quantization", "int2"), "int2"),
        (("--model", "glm-4-9b", "--context", "0"), "at least 1"),
    ],
)
def test_plan_rejects_bad_options(args: tuple[str, ...], message: str) -> None:
    result = run("plan", *args)
    assert result.exit_code == 2
    assert message in result.stderr
