"""`lm lite` (also the `lm-lite` script): the quantization commands, imported lazily by the `lm` command.

Only click is imported here; each command imports torch and transformers when it runs, so `lm lite --help` stays
instant. Argument mistakes (bad group size, missing calibration file, non-empty work dir, unsupported architecture)
print one `Error:` line and exit 1 before any model loads.
"""

from __future__ import annotations

from collections.abc import Callable

import click

from lm_core.cli.base import CONTEXT_SETTINGS, LMGroup


@click.group(cls=LMGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="lm-lite", prog_name="lm-lite")
def lite() -> None:
    """Quantize models (AWQ, GPTQ, SmoothQuant, FP8) and calibrate them."""


def _common(func: Callable) -> Callable:
    """Options every calibrating command shares (LMDeploy's names)."""
    options = [
        click.argument("model", required=False),
        click.option("--work-dir", default="./work_dir", show_default=True, help="Where the checkpoint is written."),
        click.option("--overwrite", is_flag=True, help="Write into a non-empty work dir (replacing its weights)."),
        click.option(
            "--calib-dataset",
            default=None,
            help="A .txt or .jsonl file, a Hugging Face dataset (wikitext2, c4, ptb, pileval, org/name), or "
            "'builtin' (the default: text shipped with lm-lite).",
        ),
        click.option("--calib-samples", default=128, show_default=True, type=int, help="Calibration sequences."),
        click.option("--calib-seqlen", default=2048, show_default=True, type=int, help="Tokens per sequence."),
        click.option("--batch-size", default=1, show_default=True, type=int, help="Sequences per forward pass."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option(
            "--dtype",
            default="auto",
            show_default=True,
            type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
            help="Precision of the calibration forward passes.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


GROUP_HELP = "Inputs per group (-1: per channel; default: 128, or 64 or 32 where 128 does not divide every layer)."


def _run(name: str, **kwargs) -> None:
    import lm_lite

    try:
        out = getattr(lm_lite, name)(**kwargs)
    except ValueError as exc:  # our checks: one line, no traceback
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {out}")


@lite.command("auto_awq")
@_common
@click.option("--w-bits", default=4, show_default=True, type=int, help="Weight bits (AutoAWQ GEMM: 4).")
@click.option("--w-group-size", type=int, help=GROUP_HELP)
@click.option("--search-scale/--no-search-scale", default=True, show_default=True, help="Grid-search AWQ scales.")
def auto_awq_command(model, **kwargs) -> None:
    """AWQ 4-bit weights; writes an AutoAWQ GEMM checkpoint."""
    _run("auto_awq", model=model, **kwargs)


@lite.command("auto_gptq")
@_common
@click.option("--w-bits", default=4, show_default=True, type=int, help="Weight bits: 2, 4 or 8.")
@click.option("--w-group-size", type=int, help=GROUP_HELP)
@click.option("--desc-act/--no-desc-act", default=True, show_default=True, help="Act-order column order.")
@click.option("--sym/--no-sym", default=True, show_default=True, help="Symmetric integer grid.")
@click.option("--damp-percent", default=0.01, show_default=True, type=float, help="Hessian damping.")
def auto_gptq_command(model, **kwargs) -> None:
    """GPTQ weights; writes a GPTQ checkpoint."""
    _run("auto_gptq", model=model, **kwargs)


@lite.command("smooth_quant")
@_common
@click.option("--alpha", default=0.5, show_default=True, type=float, help="Migration strength.")
@click.option(
    "--quant-dtype",
    default="int8",
    show_default=True,
    type=click.Choice(["int8", "float8_e4m3fn"]),
    help="Weight (and activation) type.",
)
def smooth_quant_command(model, **kwargs) -> None:
    """SmoothQuant W8A8 (per-token dynamic activations); writes LMDeploy's smooth_quant checkpoint."""
    _run("smooth_quant", model=model, **kwargs)


@lite.command("fp8")
@click.argument("model", required=False)
@click.option("--work-dir", default="./work_dir", show_default=True, help="Where the checkpoint is written.")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty work dir (replacing its weights).")
def fp8_command(model, work_dir, overwrite) -> None:
    """Blocked FP8 weights (128x128 blocks, round to nearest, no calibration); writes the DeepSeek-V3 / Qwen3-FP8
    checkpoint format."""
    from lm_lite.fp8 import quantize_fp8

    try:
        out = quantize_fp8(model, work_dir, overwrite)
    except ValueError as exc:  # our checks: one line, no traceback
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {out}")


@lite.command("calibrate")
@_common
def calibrate_command(model, **kwargs) -> None:
    """Save per-channel activation statistics of every decoder linear into the work dir."""
    _run("calibrate", model=model, **kwargs)


def main() -> None:
    """Entry point of the `lm-lite` script."""
    lite.main(prog_name="lm-lite")
