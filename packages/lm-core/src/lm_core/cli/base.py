"""What every lm command group shares: `-`/`_` flag spelling and one-line errors for user mistakes."""

from __future__ import annotations

from typing import Any

import click

from lm_core.errors import LMDeployError


def normalize_token(token: str) -> str:
    """A flag or choice with `_` spelled `-`: `--server_name` and `--server-name` are the same flag, as LMDeploy users
    type both."""
    return token.replace("_", "-")


CONTEXT_SETTINGS: dict[str, Any] = {
    "token_normalize_func": normalize_token,
    "help_option_names": ["-h", "--help"],
}


class LMGroup(click.Group):
    """A click group that reports `LMDeployError`s as `Error: <message>` and exit code 1, with no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        """Runs the subcommand; an `LMDeployError` becomes a one-line click error."""
        try:
            return super().invoke(ctx)
        except LMDeployError as exc:
            raise click.ClickException(str(exc)) from None
