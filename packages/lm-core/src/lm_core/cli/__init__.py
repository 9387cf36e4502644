"""The `lm` command: a click group whose subcommands come from the installed lm packages.

Each package lists its commands under the entry-point group `lm_deploy.cli`; a command's module is imported only
when that command runs (or when `--help` lists it), and command modules import nothing heavy at module level, so
`lm --help` never imports torch.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import click

from lm_core.cli.base import CONTEXT_SETTINGS, LMGroup

ENTRY_POINT_GROUP = "lm_deploy.cli"


class LazyGroup(LMGroup):
    """Subcommands discovered from entry points and imported on first use."""

    def _entry_points(self) -> dict[str, object]:
        return {ep.name.replace("_", "-"): ep for ep in entry_points(group=ENTRY_POINT_GROUP)}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self._entry_points()) | set(super().list_commands(ctx)))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        found = super().get_command(ctx, name)
        if found is not None:
            return found
        ep = self._entry_points().get(name.replace("_", "-"))
        if ep is None:
            return None
        try:
            return ep.load()
        except Exception as exc:  # a broken package must not take the whole CLI down
            dist = getattr(ep.dist, "name", "its package")
            raise click.ClickException(f"command {name!r} could not be loaded from {dist}: {exc}") from None


@click.group(cls=LazyGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="lm-core", prog_name="lm-core")
def cli() -> None:
    """lm-deploy: compress, run and serve large language models.

    Commands come from the installed lm packages; with no MODEL argument a command uses the default model,
    SmolLM2-135M-Instruct. Flags accept '-' or '_' (--server-name or --server_name).
    """


def main(args: list[str] | None = None, prog_name: str | None = "lm") -> None:
    """Entry point of the `lm` script."""
    cli.main(args=args, prog_name=prog_name)
