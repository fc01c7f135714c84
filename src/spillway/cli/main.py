"""``spillway``: the command-line entry point."""

from __future__ import annotations

import click

from spillway.cli.audit_cmd import audit
from spillway.cli.batch_cmd import batch_group
from spillway.cli.cache_cmd import cache_group
from spillway.cli.config_cmd import config_group
from spillway.cli.keys_cmd import keys_group
from spillway.cli.nodes import nodes
from spillway.cli.planner_cmds import plan, roi
from spillway.cli.report import report
from spillway.cli.serve import serve


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="spillway")
def cli() -> None:
    """spillway: a private-first, OpenAI-compatible LLM gateway."""


cli.add_command(serve)
cli.add_command(config_group)
cli.add_command(nodes)
cli.add_command(roi)
cli.add_command(plan)
cli.add_command(report)
cli.add_command(cache_group)
cli.add_command(keys_group)
cli.add_command(audit)
cli.add_command(batch_group)


def main() -> None:
    cli()
