"""What every command shares: loading the config (exit 2 on error), logging, and the check
that an option which draws a chart has matplotlib (exit 2 without it)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
from aiohttp.http_exceptions import HttpProcessingError

from spillway.config.load import environ, find_config_file, load_config
from spillway.config.schema import Config
from spillway.errors import ConfigError
from spillway.secrets import RedactingFilter, Redactor

CONFIG_ERROR_EXIT = 2
#: An option needs an extra that is not installed: like a bad configuration, nothing has run.
MISSING_EXTRA_EXIT = 2

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="spillway.toml to use (default: $SPILLWAY_CONFIG, ./spillway.toml, or the embedded "
    "default when neither exists).",
)


def load_or_exit(config_path: Path | None, overrides: Mapping[str, Any] | None = None) -> Config:
    env = environ()
    try:
        return load_config(find_config_file(config_path, env), env, overrides)
    except ConfigError as exc:
        click.echo(f"spillway: invalid configuration: {exc.message}", err=True)
        sys.exit(CONFIG_ERROR_EXIT)


def require_charts(option: str) -> None:
    """Exit with how to install matplotlib (the ``charts`` extra, which a server need not
    have) when ``option`` draws and it is missing. Called before the command does any work,
    so a missing extra leaves nothing half done; the charts modules import it again to draw."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        click.echo(f"spillway: {option} needs matplotlib: pip install 'spillway[charts]'", err=True)
        sys.exit(MISSING_EXTRA_EXIT)


def setup_logging(config: Config, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter(Redactor.for_config(config)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.server").addFilter(BadRequestsQuietly())


class BadRequestsQuietly(logging.Filter):
    """aiohttp logs every request it cannot parse (a malformed header, a bad request line)
    at ERROR with a traceback, and anyone can send those, without a key: one line per request
    at INFO, with no traceback, names what was wrong without flooding the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError) and record.levelno >= logging.ERROR:
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = (
                "refused a malformed HTTP request: %s",
                (type(error).__name__,),
            )
            record.exc_info = record.exc_text = None
        return True
