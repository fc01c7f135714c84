"""What a server installs: `spillway serve` loads neither matplotlib (the ``charts`` extra) nor
anything of training (torch, transformers, sentence-transformers, scikit-learn), and an option
that draws says how to install matplotlib when it is missing, instead of a traceback.

The import checks run in a fresh interpreter: this one may have drawn a chart already."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from spillway.cli.main import cli

ADVICE = "spillway: --png needs matplotlib: pip install 'spillway[charts]'\n"
NOT_FOR_SERVE = ("matplotlib", "torch", "transformers", "sentence_transformers", "sklearn")


def without_matplotlib(monkeypatch: pytest.MonkeyPatch, *args: str) -> Result:
    # None in sys.modules makes `import matplotlib` raise ImportError, as if not installed
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_roi_png_without_matplotlib_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    png = tmp_path / "roi.png"
    result = without_matplotlib(monkeypatch, "roi", "--tokens-per-month", "10M", "--png", str(png))
    assert (result.exit_code, result.stderr, result.stdout) == (2, ADVICE, "")  # nothing ran
    assert not png.exists()


def test_report_png_without_matplotlib_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    png = tmp_path / "spend.png"
    args = ("report", "--data-dir", str(tmp_path / "data"), "--png", str(png))
    result = without_matplotlib(monkeypatch, *args)
    assert (result.exit_code, result.stderr, result.stdout) == (2, ADVICE, "")
    assert not png.exists() and not (tmp_path / "data").exists()  # the ledger was not opened


def test_commands_that_do_not_draw_need_no_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    result = without_matplotlib(monkeypatch, "roi", "--tokens-per-month", "10M")
    assert result.exit_code == 0, result.output


SERVE = """
import asyncio, sys, tempfile

from aiohttp import web

import spillway.cli.main
from spillway.cache.cross_matcher import CrossEncoderMatcher
from spillway.cache.local_embedder import LocalMiniLM
from spillway.config.load import validate
from spillway.server.app import build_app

NODE = {"kind": "private", "base_url": "http://127.0.0.1:9/v1", "models": {"m": "m"}}


async def main() -> None:
    with tempfile.TemporaryDirectory() as data:
        raw = {"server": {"data_dir": data}, "nodes": {"n": NODE}, "cache": {"mode": "semantic"}}
        runner = web.AppRunner(build_app(validate(raw)))
        await runner.setup()  # the gateway's whole start-up (its cleanup context)
        try:
            embedder = LocalMiniLM()  # what semantic mode loads in the background, loaded here
            matcher = CrossEncoderMatcher(embedder)
            await embedder.warm()
            await matcher.warm()
            await embedder.aclose()
        finally:
            await runner.cleanup()


asyncio.run(main())
print(" ".join(sorted({m.split(".")[0] for m in sys.modules})))
"""


def test_serve_loads_no_charts_and_no_training() -> None:
    """The CLI, the app's start-up and the semantic cache's models, in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", SERVE], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert {"spillway", "aiohttp", "onnxruntime"} <= loaded  # it did start, semantic cache and all
    assert loaded.isdisjoint({*NOT_FOR_SERVE, "training"}), loaded & {*NOT_FOR_SERVE, "training"}
    # The `redis` extra serves a Redis cache store only: shared state ([state]) has its own
    # client, so the embedded default (installed without the extra) must not need redis-py.
    assert "redis" not in loaded
