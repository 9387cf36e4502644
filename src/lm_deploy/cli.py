"""The `lm` script: lm-core's command dispatcher, which finds every installed package's commands."""

from lm_core.cli import main

__all__ = ["main"]
