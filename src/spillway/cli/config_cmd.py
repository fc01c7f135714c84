"""``spillway config check``: validate a configuration and print it, secrets masked."""

from __future__ import annotations

from pathlib import Path

import click
import orjson

from spillway.cli.common import config_option, load_or_exit


@click.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("check")
@config_option
def check(config_path: Path | None) -> None:
    """Validate the configuration and print it resolved, with secrets masked."""
    config = load_or_exit(config_path)
    resolved = config.model_dump(mode="json")  # SecretStr dumps as '**********'
    click.echo(orjson.dumps(resolved, option=orjson.OPT_INDENT_2).decode())
    click.echo(f"configuration OK: {len(config.nodes)} nodes, {len(config.keys)} keys", err=True)
