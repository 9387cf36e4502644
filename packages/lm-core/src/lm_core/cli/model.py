"""`lm model`: resolve a model argument to a local directory and inspect what it holds."""

from __future__ import annotations

import json

import click

from lm_core.cli.base import LMGroup


@click.group(cls=LMGroup)
def model() -> None:
    """Resolve and inspect models."""


@model.command("resolve")
@click.argument("model_name", metavar="[MODEL]", required=False)
def resolve(model_name: str | None) -> None:
    """Print the local Hugging Face directory for MODEL (fetching or converting it once)."""
    from lm_core.resolve import resolve_model

    click.echo(resolve_model(model_name))


@model.command("info")
@click.argument("model_name", metavar="[MODEL]", required=False)
def info(model_name: str | None) -> None:
    """Resolve MODEL, load its config, tokenizer and weights, and print a summary."""
    from lm_core.model_info import inspect_model
    from lm_core.resolve import resolve_model

    path = resolve_model(model_name)
    summary = inspect_model(path)
    width = max(len(k) for k in summary)
    click.echo(f"{'path':<{width}}  {path}")
    for key, value in summary.items():
        click.echo(f"{key:<{width}}  {value if isinstance(value, str) else json.dumps(value)}")
