"""The engine flags every command that loads a model takes (`lm chat`, `lm serve api_server`), declared once.

`engine_options` applies the whole list to a click command; `engine_config` turns the parsed values into the dict
the pipeline's `backend_config` takes (only the flags the user gave, so the engine's own defaults hold for the rest).
Names follow LMDeploy's (`--cache-max-entry-count`, `--quant-policy`, `--cache-block-seq-len`, `--backend pytorch`),
with vLLM's spellings where users type those (`--block-size`, `--enable-prefix-caching`). Each flag's range is
checked by click, so a bad value fails before any model loads.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import click

QUANT_POLICIES = ("0", "4", "8")
# Values of a flag that takes several (`--api-keys k1 k2`) end at one that names a model: an existing path, a .gguf
# file or a hub id (`org/name`), so that `--api-keys k1 ./model.gguf` keeps the model as the MODEL argument.
_MODEL_LIKE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w./-]+$")


def _check_backend(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from lm_core.engine_registry import canonical_backend

    try:
        return canonical_backend(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


ENGINE_OPTIONS: list[Callable[[Callable], Callable]] = [
    click.option(
        "--backend",
        default="auto",
        show_default=True,
        callback=_check_backend,
        help="Engine: auto (the best installed one), torch (alias: pytorch).",
    ),
    click.option(
        "--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), help="Weights and compute dtype."
    ),
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where the engine runs."),
    click.option(
        "--session-len",
        type=click.IntRange(min=2),
        help="Longest prompt + generation in tokens (default and limit: the model's context length).",
    ),
    click.option("--max-batch-size", type=click.IntRange(min=1), help="Most sequences decoded together."),
    click.option(
        "--cache-max-entry-count",
        type=click.FloatRange(0, 1, min_open=True),
        help="Fraction of free memory the KV cache takes.",
    ),
    click.option("--num-kv-blocks", type=click.IntRange(min=1), help="Exact number of KV-cache blocks."),
    click.option(
        "--cache-block-seq-len",
        "--block-size",
        "block_size",
        type=click.IntRange(min=1),
        help="Tokens per KV-cache block.",
    ),
    click.option(
        "--quant-policy",
        type=click.Choice(QUANT_POLICIES),
        help="KV cache quantized online: 0 off, 8 int8, 4 int4.",
    ),
    click.option("--max-prefill-token-num", type=click.IntRange(min=1), help="Token budget of one engine step."),
    click.option(
        "--enable-prefix-caching/--disable-prefix-caching",
        default=None,
        help="Reuse the KV blocks of prompts that share a prefix (default: on).",
    ),
    click.option("--eager-mode", is_flag=True, default=None, help="CUDA: no CUDA graphs."),
    click.option(
        "--cuda-graph-sizes",
        type=click.IntRange(min=1),
        multiple=True,
        help="CUDA: decode batch sizes captured as graphs (several: --cuda-graph-sizes 1 2 4 8); larger batches run "
        "eagerly (default: 1, 2, 4, 8, every 8 to 64, every 16 beyond).",
    ),
    click.option("--num-threads", type=click.IntRange(min=1), help="CPU threads for torch."),
    click.option(
        "--grammar-compile-timeout",
        type=click.FloatRange(0, min_open=True),
        help="Seconds a response_format's grammar may take to compile; a slower one fails that request (400).",
    ),
]
ENGINE_OPTION_NAMES = (
    "dtype",
    "device",
    "session_len",
    "max_batch_size",
    "cache_max_entry_count",
    "num_kv_blocks",
    "block_size",
    "quant_policy",
    "max_prefill_token_num",
    "enable_prefix_caching",
    "eager_mode",
    "cuda_graph_sizes",
    "num_threads",
    "grammar_compile_timeout",
)
# Flags that take several values after one flag in every command that has them.
SEVERAL_VALUES = ("--cuda-graph-sizes",)


def engine_options(func: Callable) -> Callable:
    """Add `--backend` and every engine flag to a click command."""
    for option in reversed(ENGINE_OPTIONS):
        func = option(func)
    return func


def engine_config(options: dict[str, Any]) -> dict[str, Any]:
    """The engine flags the user gave in `options` (a command's parameters), as the `backend_config` dict."""
    config = {k: options[k] for k in ENGINE_OPTION_NAMES if options.get(k) not in (None, ())}
    if "cuda_graph_sizes" in config:
        config["cuda_graph_sizes"] = list(config["cuda_graph_sizes"])
    if "quant_policy" in config:
        config["quant_policy"] = int(config["quant_policy"])
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
