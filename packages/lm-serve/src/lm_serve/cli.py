"""`lm serve` (also the `lm-serve` script): the server commands, imported lazily by the `lm` command."""

from __future__ import annotations

import click

from lm_core.cli.base import CONTEXT_SETTINGS, LMGroup


@click.group(cls=LMGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="lm-serve", prog_name="lm-serve")
def serve() -> None:
    """Serve models over an OpenAI-compatible HTTP API."""


def main() -> None:
    """Entry point of the `lm-serve` script."""
    serve.main(prog_name="lm-serve")
