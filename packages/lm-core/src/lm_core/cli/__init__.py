"""The `lm` command: a click group whose subcommands come from the installed lm packages.

Each package lists its commands under the entry-point group `lm_deploy.cli`; a command's module is imported only
when that command runs (or when `--help` lists it), and command modules import nothing heavy at module level, so
`lm --help` never imports torch.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

import click

from lm_core.cli.base import CONTEXT_SETTINGS, LMGroup

ENTRY_POINT_GROUP = "lm_deploy.cli"


class LazyGroup(LMGroup):
    """Subcommands discovered from entry points and imported on first use."""

    def _entry_points(self) -> dict[str, EntryPoint]:
        return {ep.name.replace("_", "-"): ep for ep in entry_points(group=ENTRY_POINT_GROUP)}

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The built-in subcommands and every installed package's, sorted."""
        return sorted(set(self._entry_points()) | set(super().list_commands(ctx)))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The subcommand `cmd_name`, importing its module on first use; None if no package provides it."""
        found = super().get_command(ctx, cmd_name)
        if found is not None:
            return found
        ep = self._entry_points().get(cmd_name.replace("_", "-"))
        if ep is None:
            return None
        try:
            return ep.load()
        except Exception as exc:  # a broken package must not take the whole CLI down
            dist = getattr(ep.dist, "name", "its package")
            raise click.ClickException(f"command {cmd_name!r} could not be loaded from {dist}: {exc}") from None


def version_text() -> str:
    """`lm --version`: lm-deploy's version, then every installed lm package's."""
    from importlib.metadata import PackageNotFoundError, version

    from lm_core.cli.check_env import LM_DISTRIBUTIONS

    installed: list[tuple[str, str]] = []
    for name in LM_DISTRIBUTIONS:
        try:
            installed.append((name, version(name)))
        except PackageNotFoundError:
            continue
    found = dict(installed)
    head = f"lm-deploy {found['lm-deploy']}" if "lm-deploy" in found else "lm-deploy (meta-package not installed)"
    parts = ", ".join(f"{name} {ver}" for name, ver in installed if name != "lm-deploy")
    return f"{head} ({parts})" if parts else head


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(version_text())
    ctx.exit()


@click.group(cls=LazyGroup, context_settings=CONTEXT_SETTINGS)
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show lm-deploy's version and every installed lm package's, and exit.",
)
def cli() -> None:
    """lm-deploy: compress, run and serve large language models.

    Commands come from the installed lm packages; with no MODEL argument a command uses the default model,
    SmolLM2-135M-Instruct. Flags accept '-' or '_' (--server-name or --server_name).
    """


def main(args: list[str] | None = None, prog_name: str | None = "lm") -> None:
    """Entry point of the `lm` script."""
    cli.main(args=args, prog_name=prog_name)
