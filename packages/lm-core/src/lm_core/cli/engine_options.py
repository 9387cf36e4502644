"""The engine flags every command that loads a model takes (`lm chat`, `lm serve api_server`), declared once.

The flags come from the options each installed engine declares on its config (for lm-torch, the `OptionSpec`
metadata of `lm_torch.config`'s fields, read from a module that imports no torch); `--backend` is the one generic
flag. `engine_options` applies the whole list to a click command; `engine_config` turns the parsed values into the
dict the pipeline's `backend_config` takes (only the flags the user gave, so the engine's own defaults hold for the
rest). Names follow LMDeploy's (`--cache-max-entry-count`, `--quant-policy`, `--cache-block-seq-len`, `--backend
pytorch`), with vLLM's spellings where users type those (`--block-size`, `--enable-prefix-caching`). Each flag's
range is checked by click, so a bad value fails before any model loads.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable
from typing import Any

import click

# Where each engine declares its options: a torch-free module and a function returning its `OptionSpec`-like
# records (attributes: name, flags, off_flags, help, kind, choices, minimum, maximum, min_open). An engine that is
# not installed contributes nothing: the commands then take the generic flags only.
ENGINE_OPTION_PROVIDERS = {"torch": "lm_torch.config:engine_options"}
# Values of a flag that takes several (`--api-keys k1 k2`) end at one that names a model: an existing path, a .gguf
# file or a hub id (`org/name`), so that `--api-keys k1 ./model.gguf` keeps the model as the MODEL argument.
_MODEL_LIKE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w./-]+$")
# A click option as a decorator of a command function.
_OptionDecorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _check_backend(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from lm_core.engine_registry import canonical_backend

    try:
        return canonical_backend(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


BACKEND_OPTION = click.option(
    "--backend",
    default="auto",
    show_default=True,
    callback=_check_backend,
    help="Engine: auto (the best installed one), torch (alias: pytorch).",
)


def declared_engine_options() -> list[Any]:
    """Every installed engine's declared options, first declaration of a name winning (imports no torch)."""
    specs: dict[str, Any] = {}
    for path in ENGINE_OPTION_PROVIDERS.values():
        module_name, _, function = path.partition(":")
        try:
            provider = getattr(importlib.import_module(module_name), function)
        except (ImportError, AttributeError):
            continue
        for spec in provider():
            specs.setdefault(spec.name, spec)
    return list(specs.values())


def _click_option(spec: Any) -> _OptionDecorator:
    """The click option of one declared engine option."""
    if spec.kind == "bool":
        if spec.off_flags:
            flags = "/".join((spec.flags[0], spec.off_flags[0]))
            return click.option(flags, spec.name, default=None, help=spec.help)
        return click.option(*spec.flags, spec.name, is_flag=True, default=None, help=spec.help)
    if spec.choices is not None:
        kind: Any = click.Choice([str(c) for c in spec.choices])
    elif spec.kind in ("int", "int_list"):
        kind = click.IntRange(min=spec.minimum, max=spec.maximum, min_open=spec.min_open)
    elif spec.kind == "float":
        kind = click.FloatRange(min=spec.minimum, max=spec.maximum, min_open=spec.min_open)
    else:
        kind = str
    return click.option(*spec.flags, spec.name, type=kind, multiple=spec.kind == "int_list", help=spec.help)


_SPECS = declared_engine_options()
ENGINE_OPTIONS: list[_OptionDecorator] = [BACKEND_OPTION, *(_click_option(s) for s in _SPECS)]
ENGINE_OPTION_NAMES = tuple(spec.name for spec in _SPECS)
# Flags that take several values after one flag in every command that has them.
SEVERAL_VALUES = tuple(spec.flags[0] for spec in _SPECS if spec.kind == "int_list")


def engine_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add `--backend` and every engine flag to a click command."""
    for option in reversed(ENGINE_OPTIONS):
        func = option(func)
    return func


def engine_config(options: dict[str, Any]) -> dict[str, Any]:
    """The engine flags the user gave in `options` (a command's parameters), as the `backend_config` dict."""
    config: dict[str, Any] = {}
    for spec in _SPECS:
        value = options.get(spec.name)
        if value in (None, ()):
            continue
        if spec.kind == "int_list":
            value = list(value)
        elif spec.choices is not None and spec.kind == "int":
            value = int(value)
        config[spec.name] = value
    return config


def looks_like_model(value: str) -> bool:
    """Whether a command-line value names a model (an existing path, a .gguf file, a hub id) rather than a flag's."""
    return os.path.exists(value) or value.lower().endswith(".gguf") or bool(_MODEL_LIKE.match(value))


class SeveralValuesCommand(click.Command):
    """A command whose `several_values` flags take several values after one flag (`--api-keys k1 k2`, as LMDeploy's;
    `--cuda-graph-sizes 1 2 4`, as vLLM's). Click options take one value each, so each value gets its own copy of the
    flag; the values end at the next flag or at one that `looks_like_model`."""

    several_values: tuple[str, ...] = SEVERAL_VALUES

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Give each value after a several-values flag its own copy of the flag, then parse as click does."""
        rewritten: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            flag = arg.replace("_", "-")
            if flag in self.several_values:
                i += 1
                taken = 0
                while i < len(args) and not args[i].startswith("-") and not (taken and looks_like_model(args[i])):
                    rewritten += [flag, args[i]]
                    i += 1
                    taken += 1
                if not taken:
                    rewritten.append(arg)  # let click report the missing value
                continue
            rewritten.append(arg)
            i += 1
        return super().parse_args(ctx, rewritten)
