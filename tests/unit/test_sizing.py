"""plan's memory arithmetic, checked against hand-computed byte counts."""

from decimal import Decimal
from pathlib import Path

import pytest

from spillway.errors import ConfigError
from spillway.planner.profiles import ACCELERATORS, MODELS, ModelProfile, load_book, parse_count
from spillway.planner.sizing import (
    GIB,
    Deployment,
    gib,
    kv_bytes_per_token,
    report_data,
    size,
    usable_bytes,
    weight_bytes,
)

D = Decimal
K32 = 32_768
QWEN = MODELS["qwen2.5-32b"]
H100 = ACCELERATORS["h100-80gb"]
QWEN_KV_32K = 262_144 * K32  # 8 GiB


def qwen_on_h100(**kwargs: object) -> Deployment:
    return Deployment(QWEN, H100, context=K32, **kwargs)  # type: ignore[arg-type]


# --- the parts --------------------------------------------------------------------------------


def test_model_profiles_match_their_public_configs() -> None:
    shapes = {k: (m.layers, m.kv_heads, m.head_dim) for k, m in MODELS.items()}
    assert shapes == {
        "glm-4-9b": (40, 2, 128),
        "glm-4-32b": (61, 2, 128),
        "qwen2.5-32b": (64, 8, 128),
        "llama-3-70b": (80, 8, 128),
    }
    assert MODELS["llama-3-70b"].params == 70_553_706_496


def test_kv_bytes_per_token_is_two_times_layers_heads_dim_bytes() -> None:
    assert kv_bytes_per_token(QWEN, "bf16") == 2 * 64 * 8 * 128 * 2 == 262_144
    assert kv_bytes_per_token(MODELS["glm-4-9b"], "bf16") == 40_960
    assert kv_bytes_per_token(MODELS["llama-3-70b"], "fp8") == 163_840
    assert kv_bytes_per_token(ModelProfile("x", "X", 10**9), "bf16") is None


def test_weight_bytes_add_ten_percent_and_round_up() -> None:
    assert weight_bytes(QWEN.params, "bf16") == 72_080_527_975  # 32,763,876,352 x 2.2
    assert weight_bytes(QWEN.params, "fp16") == weight_bytes(QWEN.params, "bf16")
    assert weight_bytes(QWEN.params, "int8") == 36_040_263_988
    assert weight_bytes(QWEN.params, "int4") == 18_020_131_994
    assert weight_bytes(10, "bf16") == 22


def test_usable_bytes_are_ninety_percent_of_the_cards() -> None:
    assert usable_bytes(H100, 1, D("0.9")) == 77_309_411_328  # 80 GiB x 0.9
    assert usable_bytes(H100, 2, D("0.9")) == 2 * 77_309_411_328
    assert usable_bytes(ACCELERATORS["ascend-910b"], 8, D("0.9")) == 494_780_232_499


# --- "CUDA out of memory loading a 32B model" --------------------------------------------------


def test_qwen_32b_bf16_does_not_fit_one_80gb_card_at_32k_context() -> None:
    report = size(qwen_on_h100())
    asked = report.asked
    assert asked.required == 72_080_527_975 + QWEN_KV_32K
    assert not asked.fits
    assert asked.max_concurrency == 0
    assert asked.cards_needed == 2
    assert report.verdict.startswith("Does not fit. Qwen2.5-32B at bf16 with 32,768-token")
    assert "needs 75.1 GiB" in report.verdict and "offers 72.0 GiB usable" in report.verdict
    assert "use int8; or use 2 cards at bf16" in report.verdict


def test_qwen_32b_int4_fits_one_80gb_card_at_32k_context() -> None:
    report = size(qwen_on_h100(quantization="int4"))
    assert report.asked.fits
    assert report.verdict.startswith("Fits.")
    # (77,309,411,328 - 18,020,131,994) / 8,589,934,592 = 6.9
    assert report.asked.max_concurrency == 6


def test_lightest_quantization_and_largest_concurrency_for_qwen_32b() -> None:
    report = size(qwen_on_h100())
    assert report.lightest_fitting == "int8"
    table = {f.quantization: (f.fits, f.max_concurrency) for f in report.by_quantization}
    assert table == {"bf16": (False, 0), "int8": (True, 4), "int4": (True, 6)}


def test_two_h100s_hold_qwen_32b_bf16_at_32k() -> None:
    report = size(qwen_on_h100(count=2))
    assert report.asked.fits
    assert report.asked.max_concurrency == 9  # (154.6e9 - 72.1e9) / 8.59e9 = 9.6


def test_concurrency_multiplies_the_kv_cache() -> None:
    report = size(qwen_on_h100(quantization="int4", concurrency=7))
    assert report.asked.kv_cache == 7 * QWEN_KV_32K
    assert not report.asked.fits
    assert "shorten the context or lower the concurrency" in report.verdict
    assert size(qwen_on_h100(quantization="int4", concurrency=6)).asked.fits


def test_fp8_kv_cache_halves_the_cache() -> None:
    half = size(qwen_on_h100(quantization="int4", kv_dtype="fp8")).asked
    assert half.kv_cache == QWEN_KV_32K // 2
    assert half.max_concurrency == 13


def test_glm_4_9b_on_one_ascend_910b() -> None:
    d = Deployment(MODELS["glm-4-9b"], ACCELERATORS["ascend-910b"])
    asked = size(d).asked
    assert asked.fits
    # (61,847,529,062 - 20,679,892,992) / (40,960 x 8,192) = 122.7
    assert asked.max_concurrency == 122


def test_glm_4_32b_needs_int8_on_one_ascend_910b() -> None:
    report = size(Deployment(MODELS["glm-4-32b"], ACCELERATORS["ascend-910b"]))
    assert not report.asked.fits  # 71.6e9 bytes of weights > 61.8e9 usable
    assert report.lightest_fitting == "int8"
    assert report.asked.cards_needed == 2


def test_llama_3_70b_on_eight_ascend_910b_and_one_h200() -> None:
    eight = size(Deployment(MODELS["llama-3-70b"], ACCELERATORS["ascend-910b"], count=8)).asked
    assert eight.fits
    # (494,780,232,499 - 155,218,154,292) / (327,680 x 8,192) = 126.5
    assert eight.max_concurrency == 126
    h200 = size(Deployment(MODELS["llama-3-70b"], ACCELERATORS["h200"]))
    assert not h200.asked.fits
    assert h200.lightest_fitting == "int8"


def test_nothing_fits_names_no_quantization() -> None:
    report = size(Deployment(MODELS["llama-3-70b"], ACCELERATORS["rtx-4090"]))
    assert report.lightest_fitting is None
    assert all(not f.fits for f in report.by_quantization)
    # (155,218,154,292 + 2,684,354,560) / 23,192,823,398 = 6.8
    assert report.asked.cards_needed == 7


def test_params_without_a_shape_count_the_weights_only() -> None:
    model = ModelProfile("custom", "32B-parameter model", parse_count("32B"))
    report = size(Deployment(model, H100))
    assert report.asked.kv_cache is None
    assert report.asked.max_concurrency is None
    assert report.asked.required == 70_400_000_000
    assert "KV cache not counted" in report.verdict
    assert report.verdict.startswith("Fits.")


def test_shape_overrides_complete_a_bare_parameter_count() -> None:
    model = ModelProfile("custom", "X", 10**9).overridden(layers=64, kv_heads=8, head_dim=128)
    assert model.has_kv_shape
    assert kv_bytes_per_token(model, "bf16") == 262_144
    assert QWEN.overridden(params=5) == ModelProfile(QWEN.key, QWEN.name, 5, 64, 8, 128)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"quantization": "int3"},
        {"kv_dtype": "int2"},
        {"count": 0},
        {"concurrency": 0},
        {"context": 0},
        {"memory_utilisation": D("1.5")},
        {"memory_utilisation": D(0)},
    ],
)
def test_deployment_rejects_impossible_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Deployment(QWEN, H100, **kwargs)  # type: ignore[arg-type]


def test_report_data_is_plain_json_data() -> None:
    data = report_data(size(qwen_on_h100()))
    assert data["fits"] is False
    assert data["lightest_fitting_quantization"] == "int8"
    assert data["required_bytes"] == 72_080_527_975 + QWEN_KV_32K
    assert data["model"] == {  # type: ignore[comparison-overlap]
        "key": "qwen2.5-32b",
        "name": "Qwen2.5-32B",
        "params": QWEN.params,
        "layers": 64,
        "kv_heads": 8,
        "head_dim": 128,
    }
    assert [f["quantization"] for f in data["by_quantization"]] == ["bf16", "int8", "int4"]  # type: ignore[attr-defined, index]


def test_gib_formats_one_decimal() -> None:
    assert gib(80 * GIB) == "80.0"
    assert gib(80_670_462_567) == "75.1"


# --- counts -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("32B", 32_000_000_000),
        ("32b", 32_000_000_000),
        ("32e9", 32_000_000_000),
        ("7.5B", 7_500_000_000),
        ("10M", 10_000_000),
        ("1,000", 1000),
        ("250_000", 250_000),
        ("32k", 32_000),
        (" 8192 ", 8192),
        (70, 70),
    ],
)
def test_parse_count(text: str | int, expected: int) -> None:
    assert parse_count(text) == expected


def test_parse_count_binary_for_context_lengths() -> None:
    assert parse_count("32k", binary=True) == 32_768
    assert parse_count("128K", binary=True) == 131_072
    assert parse_count("1M", binary=True) == 1_048_576
    assert parse_count("8192", binary=True) == 8192


@pytest.mark.parametrize("text", ["", "B", "thirty", "1.5", "1e-3", "-5", "32Q", True, -1])
def test_parse_count_rejects(text: str | int) -> None:
    with pytest.raises(ValueError):
        parse_count(text)


# --- accelerators and models from TOML ----------------------------------------------------------


def test_profiles_file_adds_models_and_accelerators(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        """
[accelerators.my-card]
name = "My card"
memory_gib = 48
tdp_w = 300

[models.my-14b]
name = "My 14B"
params = "14.7B"
layers = 48
kv_heads = 8
head_dim = 128
"""
    )
    book = load_book(path)
    card, model = book.accelerators["my-card"], book.models["my-14b"]
    assert (card.memory_gib, card.tdp_w, card.source) == (D(48), 300, "user")
    assert model == ModelProfile("my-14b", "My 14B", 14_700_000_000, 48, 8, 128)
    assert size(Deployment(model, card)).asked.fits
    assert "h100-80gb" in book.accelerators and "qwen2.5-32b" in book.models


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[models.m]\nlayers = 2", "models.m.params"),
        ("[models.m]\nparams = '1.5'", "models.m.params"),
        ("[models.m]\nparams = 10\nkv_heads = 0", "models.m.kv_heads"),
        ("[accelerators.a]\nname = 'A'", "accelerators.a.memory_gib"),
        ("[accelerators.a]\nmemory_gib = 'lots'", "accelerators.a.memory_gib"),
        ("[accelerators.a]\nmemory_gib = 8\nhbm = true", "accelerators.a.hbm"),
    ],
)
def test_profiles_file_errors_name_the_setting(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_book(path)
    assert caught.value.path == where


def test_missing_profiles_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_book(tmp_path / "absent.toml")
