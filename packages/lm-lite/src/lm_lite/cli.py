"""`lm lite` (also the `lm-lite` script): the quantization commands, imported lazily by the `lm` command."""

from __future__ import annotations

import click

from lm_core.cli.base import CONTEXT_SETTINGS, LMGroup


@click.group(cls=LMGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="lm-lite", prog_name="lm-lite")
def lite() -> None:
    """Quantize models (AWQ, GPTQ, SmoothQuant) and calibrate them."""


def main() -> None:
    """Entry point of the `lm-lite` script."""
    lite.main(prog_name="lm-lite")
