"""The embedded node's llama.cpp build runs on any CPU of this machine's family.

A build with llama.cpp's native CPU detection on a CPU with AMX holds AMX tile instructions,
and died with SIGILL on such a machine (and would on any CPU without AMX). These tests check
the installed libraries themselves, so they fail on a machine that reused a native wheel from
pip's cache, whatever CPU runs them.
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "install_llama_cpp.py"
#: The CPU of the machine where the native build crashed (issue #16), as /proc/cpuinfo shows it.
AMX_CPU_FLAGS = (
    "fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi1 bmi2 avx512f avx512dq avx512bw "
    "avx512vl avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8"
)
AMX_SOURCE = """
#include <immintrin.h>
void load_tile(const void *p) { _tile_loadd(0, p, 64); _tile_dpbssd(1, 2, 3); }
"""

x86_only = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64"), reason="AMX and AVX-512 are x86 instructions"
)


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=False
    )


def ggml_cpu() -> Path:
    import llama_cpp

    return (Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so").resolve()


@x86_only
def test_the_installed_llama_cpp_holds_no_amx_instruction() -> None:
    result = run_script("--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no AMX instructions" in result.stdout


@x86_only
def test_the_installed_llama_cpp_is_not_tuned_to_the_build_machine() -> None:
    """No AVX-512 register either: the portable tiers stop at AVX2. A native build on an
    AVX-512 machine (like the one that crashed) would use zmm registers everywhere."""
    objdump = shutil.which("objdump")
    assert objdump is not None, "objdump (binutils) is needed to check the build"
    listing = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", str(ggml_cpu())],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "%zmm" not in listing
    assert "%ymm" in listing  # the AVX2 tier is in use where the CPU has it


@x86_only
def test_the_check_finds_amx_instructions_where_there_are_some(tmp_path: Path) -> None:
    """The objdump check can fail: a library with two AMX instructions is refused."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler to build a library with AMX instructions")
    source = tmp_path / "amx.c"
    source.write_text(AMX_SOURCE)
    library = tmp_path / "libggml-cpu.so"
    subprocess.run(
        [compiler, "-O2", "-mamx-tile", "-mamx-int8", "-shared", "-fPIC", "-o", str(library),
         str(source)],
        check=True,
    )  # fmt: skip
    result = run_script("--check", "--lib-dir", str(tmp_path))
    assert result.returncode != 0
    assert re.search(r"AMX instructions \{'libggml-cpu.so': 2\}", result.stderr), result.stderr


def test_the_amx_cpu_gets_the_avx2_tier_with_native_avx512_and_amx_off(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {AMX_CPU_FLAGS}\n")
    result = run_script("--dry-run", "--cpuinfo", str(cpuinfo), "--machine", "x86_64")
    plan = json.loads(result.stdout)
    assert plan["tier"] == "x86-64-v3"
    args = set(plan["cmake_args"])
    assert {"-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON"} <= args
    for off in ("AMX_TILE", "AMX_INT8", "AMX_BF16", "AVX512", "AVX512_VNNI", "AVX512_BF16"):
        assert f"-DGGML_{off}=OFF" in args


def test_older_and_other_cpus_get_a_tier_they_can_run(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx\n")
    plan = json.loads(
        run_script("--dry-run", "--cpuinfo", str(cpuinfo), "--machine", "x86_64").stdout
    )
    assert plan["tier"] == "x86-64-v2"
    assert "-DGGML_AVX=OFF" in plan["cmake_args"] and "-DGGML_SSE42=ON" in plan["cmake_args"]
    arm = json.loads(run_script("--dry-run", "--machine", "aarch64").stdout)
    assert (arm["tier"], arm["cmake_args"]) == ("aarch64-baseline", ["-DGGML_NATIVE=OFF"])


def test_the_script_and_pyproject_pin_the_same_version() -> None:
    import llama_cpp

    plan = json.loads(run_script("--dry-run").stdout)
    assert plan["version"] == llama_cpp.__version__
