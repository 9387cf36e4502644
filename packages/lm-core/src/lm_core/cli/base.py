"""What every lm command group shares: `-`/`_` flag spelling and one-line errors for user mistakes."""

from __future__ import annotations

import click

from lm_core.errors import LMDeployError

# `--server_name` and `--server-name` are the same flag, as LMDeploy users type both.
CONTEXT_SETTINGS = {
    "token_normalize_func": lambda token: token.replace("_", "-"),
    "help_option_names": ["-h", "--help"],
}


class LMGroup(click.Group):
    """A click group that reports `LMDeployError`s as `Error: <message>` and exit code 1, with no traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LMDeployError as exc:
            raise click.ClickException(str(exc)) from None
