"""Install llama-cpp-python, the embedded node's server, as a build that runs on any CPU of
this machine's family, never one tuned to the build machine.

Why this exists: llama-cpp-python ships no Linux wheel, so pip compiles it, and llama.cpp's
default is ``-march=native``. On a CPU that reports AMX (or a VM whose CPU flags promise AMX
the hypervisor does not deliver) that build runs AMX tile instructions and dies with SIGILL
on the first request. pip's wheel cache is keyed on the source archive, not on CMAKE_ARGS,
so a natively built wheel from an earlier install would also be reused for ever.

So this script:

1. picks a fixed instruction-set tier from /proc/cpuinfo (x86-64-v3: AVX2/FMA/F16C/BMI2;
   else v2: SSE4.2; else the architecture's baseline), with GGML_NATIVE, AVX-512 and AMX off;
2. builds the wheel with pip's cache off, into a cache of its own keyed on the version and
   the exact CMake arguments, and installs that wheel;
3. refuses the result if its libraries hold an AMX instruction (objdump).

Measured (docs/architecture.md, "How llama-cpp-python is built"): on SmolLM2-135M the v3
build generates 4-7 % slower than a native AVX-512 one, less than the noise between rounds.

Usage (the Makefile runs it with the venv's python before ``pip install -e .[local]``):

    python scripts/install_llama_cpp.py            # install, or keep a matching install
    python scripts/install_llama_cpp.py --dry-run  # print the tier and CMake arguments
    python scripts/install_llama_cpp.py --check    # only check the installed libraries

``SPILLWAY_LLAMA_CMAKE_ARGS`` adds CMake arguments after the tier's (for example
``-DGGML_CUDA=ON`` on a GPU host); the AMX check still applies.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "llama-cpp-python"
#: Written into the environment's prefix: what the installed build was made with.
MARKER = Path(sys.prefix) / "spillway-llama-build.json"
EXTRA_ENV = "SPILLWAY_LLAMA_CMAKE_ARGS"

#: Every x86 CPU option a tier does not turn on is turned off explicitly, so no default (and
#: no CMAKE_ARGS left in the environment) can slip an instruction set in.
X86_OPTIONS = (
    "SSE42", "AVX", "AVX2", "FMA", "F16C", "BMI2", "AVX_VNNI", "AVX512", "AVX512_VBMI",
    "AVX512_VNNI", "AVX512_BF16", "AMX_TILE", "AMX_INT8", "AMX_BF16",
)  # fmt: skip
#: (tier, CPU flags it needs, ggml options it turns on), best first.
X86_TIERS = (
    ("x86-64-v3", {"avx", "avx2", "fma", "f16c", "bmi2", "sse4_2"},
     {"SSE42", "AVX", "AVX2", "FMA", "F16C", "BMI2"}),
    ("x86-64-v2", {"sse4_2"}, {"SSE42"}),
    ("x86-64", set(), set()),
)  # fmt: skip
#: AMX's instructions as objdump spells them: tile loads, stores, dot products, config.
AMX_INSTRUCTION = re.compile(
    r"\s(tileloadd\w*|tilestored|tilezero|tilerelease|ldtilecfg|sttilecfg|tdp\w+)\s"
)


def cpu_flags(cpuinfo: Path) -> set[str]:
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def choose(machine: str, flags: set[str]) -> tuple[str, list[str]]:
    """The tier for this CPU and the CMake arguments that build it."""
    args = ["-DGGML_NATIVE=OFF"]
    if machine not in ("x86_64", "amd64", "AMD64"):
        return f"{machine}-baseline", args
    for tier, needs, enables in X86_TIERS:
        if needs <= flags:
            args += [f"-DGGML_{opt}={'ON' if opt in enables else 'OFF'}" for opt in X86_OPTIONS]
            return tier, args
    raise AssertionError("the last tier needs nothing")


def pinned_version() -> str:
    """The exact version pyproject.toml's ``local`` extra pins (one source of truth)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["optional-dependencies"]["local"]:
        found = re.fullmatch(r"llama-cpp-python(?:\[[\w,]+\])?==([\w.]+)", requirement)
        if found:
            return found.group(1)
    raise SystemExit("pyproject.toml must pin llama-cpp-python with == in the 'local' extra")


def library_dir() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def amx_instructions(lib_dir: Path) -> dict[str, int]:
    """How many AMX instructions each installed ggml/llama library holds (absent: none)."""
    objdump = shutil.which("objdump")
    if objdump is None:
        raise SystemExit("objdump not found: install binutils (apt-get install binutils)")
    found = {}
    for lib in sorted({path.resolve() for path in lib_dir.glob("lib*.so*")}):
        listing = subprocess.run(
            [objdump, "-d", "--no-show-raw-insn", str(lib)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        count = len(AMX_INSTRUCTION.findall(listing))
        if count:
            found[lib.name] = count
    return found


def check(lib_dir: Path | None = None) -> None:
    lib_dir = lib_dir or library_dir()
    if lib_dir is None:
        raise SystemExit("llama-cpp-python is not installed in this environment")
    amx = amx_instructions(lib_dir)
    if amx:
        raise SystemExit(
            f"the installed llama.cpp holds AMX instructions {amx}: it was built for another "
            f"CPU and can die with SIGILL. Rebuild it: {sys.executable} {Path(__file__)}"
        )


def current(want: dict[str, object]) -> bool:
    try:
        return library_dir() is not None and json.loads(MARKER.read_text()) == want
    except (OSError, ValueError):
        return False


def build(version: str, args: list[str], into: Path) -> Path:
    """Compile the wheel with pip's wheel cache off, into a directory of our own."""
    into.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CMAKE_ARGS=" ".join(args), FORCE_CMAKE="1")
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
    print(f"building {PACKAGE} {version} ({' '.join(args)}); this takes minutes", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-cache-dir", "--no-deps",
         "--no-binary", PACKAGE, "-w", str(into), f"{PACKAGE}=={version}"],
        env=env, check=True,
    )  # fmt: skip
    return wheel_in(into)


def wheel_in(directory: Path) -> Path:
    wheels = sorted(directory.glob("llama_cpp_python-*.whl"))
    if len(wheels) != 1:
        raise FileNotFoundError(directory)
    return wheels[0]


def cache_dir(version: str, tier: str, args: list[str]) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(" ".join(args).encode()).hexdigest()[:12]
    return base / "spillway" / "wheels" / f"{PACKAGE}-{version}-{tier}-{digest}"


def wanted(machine: str, cpuinfo: Path) -> dict[str, object]:
    """The build this machine should have: version, tier and CMake arguments."""
    tier, args = choose(machine, cpu_flags(cpuinfo))
    args += os.environ.get(EXTRA_ENV, "").split()
    return {"version": pinned_version(), "tier": tier, "cmake_args": args}


def install(want: dict[str, object]) -> None:
    version, tier, args = str(want["version"]), str(want["tier"]), want["cmake_args"]
    assert isinstance(args, list)
    if current(want):
        check()
        print(f"{PACKAGE} {version} already built for {tier}")
        return
    where = cache_dir(version, tier, args)
    try:
        wheel = wheel_in(where)
    except FileNotFoundError:
        shutil.rmtree(where, ignore_errors=True)
        wheel = build(version, args, where)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", str(wheel)],
        check=True,
    )
    check()
    MARKER.write_text(json.dumps(want, indent=2) + "\n")
    print(f"{PACKAGE} {version} installed, built for {tier}: {wheel}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the tier and arguments")
    parser.add_argument("--check", action="store_true", help="check the installed libraries")
    parser.add_argument("--lib-dir", type=Path, help="with --check: check these libraries")
    parser.add_argument("--cpuinfo", type=Path, default=Path("/proc/cpuinfo"))
    parser.add_argument("--machine", default=platform.machine())
    options = parser.parse_args()
    want = wanted(options.machine, options.cpuinfo)
    if options.dry_run:
        print(json.dumps(want))
    elif options.check:
        check(options.lib_dir)
        print("no AMX instructions in the llama.cpp libraries")
    else:
        install(want)


if __name__ == "__main__":
    main()
