"""The public quantization functions: `auto_awq`, `auto_gptq`, `smooth_quant`, `calibrate`, `rtn`.

Each checks its arguments, the model's architecture and shapes, the calibration source and the work dir first
(`options`), so that a mistake fails at once; then loads the model on the CPU, walks it one decoder layer at a time
on the device, and writes a standard checkpoint into the work dir, whose path it returns.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lm_lite.options import CalibOptions, Job, check_bits, check_group, prepare_job

PathLike = str | os.PathLike


def auto_awq(
    model: PathLike | None,
    work_dir: PathLike = "./work_dir",
    w_bits: int = 4,
    w_group_size: int | None = None,
    calib_dataset: str | None = None,
    calib_samples: int = 128,
    calib_seqlen: int = 2048,
    search_scale: bool = True,
    batch_size: int = 1,
    device: str = "auto",
    dtype: str = "auto",
    overwrite: bool = False,
) -> Path:
    """AWQ: activation-aware scales (grid-searched when `search_scale`, else the ratio 0.5), weight clipping
    search, 4-bit asymmetric groups; writes an AutoAWQ GEMM checkpoint (`quant_method: awq`)."""
    check_bits(w_bits, (4,), "AWQ (AutoAWQ's GEMM layout holds 4 bits)")
    check_group(w_group_size)
    calib = CalibOptions(calib_dataset, calib_samples, calib_seqlen, batch_size, device, dtype)
    job = prepare_job(model, work_dir, overwrite, w_group_size, pack_axis="out", grouped=True)
    _say(f"AWQ {w_bits}-bit, group size {job.group_size}: {job.model_dir} -> {job.work_dir}")
    from lm_lite import awq  # torch: only once the arguments are known to be good

    settings = awq.AWQSettings(bits=w_bits, group_size=job.grouped_size, search_scale=bool(search_scale))
    quantization_config = {
        "quant_method": "awq",
        "version": "gemm",
        "bits": w_bits,
        "group_size": job.group_size,
        "zero_point": True,
        "modules_to_not_convert": _not_converted(job),
    }
    return _quantize_walk(
        job,
        calib,
        "awq",
        lambda walker, i, model, config: awq.quantize_layer(walker, i, job.family, config, settings),
        quantization_config,
    )


def auto_gptq(
    model: PathLike | None,
    work_dir: PathLike = "./work_dir",
    w_bits: int = 4,
    w_group_size: int | None = None,
    desc_act: bool = True,
    sym: bool = True,
    damp_percent: float = 0.01,
    calib_dataset: str | None = None,
    calib_samples: int = 128,
    calib_seqlen: int = 2048,
    batch_size: int = 1,
    device: str = "auto",
    dtype: str = "auto",
    overwrite: bool = False,
) -> Path:
    """GPTQ with lazy batched updates, act-order (`desc_act`, on by default: it generalises much better beyond the
    calibration text, docs/quantization.md) and damping; writes the GPTQ (v1) layout."""
    check_bits(w_bits, (2, 4, 8), "GPTQ")
    check_group(w_group_size)
    if not 0 < damp_percent < 1:
        raise ValueError(f"damp_percent must be in (0, 1), got {damp_percent!r}")
    calib = CalibOptions(calib_dataset, calib_samples, calib_seqlen, batch_size, device, dtype)
    job = prepare_job(model, work_dir, overwrite, w_group_size, pack_axis="in", pack_factor=32 // w_bits, grouped=True)
    _say(f"GPTQ {w_bits}-bit, group size {job.group_size}: {job.model_dir} -> {job.work_dir}")
    from lm_lite import gptq  # torch: only once the arguments are known to be good

    settings = gptq.GPTQSettings(w_bits, job.grouped_size, bool(sym), bool(desc_act), float(damp_percent))
    quantization_config = {
        "quant_method": "gptq",
        "bits": w_bits,
        "group_size": job.group_size,
        "desc_act": bool(desc_act),
        "sym": bool(sym),
        "damp_percent": float(damp_percent),
        "true_sequential": True,
        "static_groups": False,
        "checkpoint_format": "gptq",
        "modules_to_not_convert": _not_converted(job),
    }
    return _quantize_walk(
        job,
        calib,
        "gptq",
        lambda walker, i, model, config: gptq.quantize_layer(walker, i, job.family, settings),
        quantization_config,
    )


def smooth_quant(
    model: PathLike | None,
    work_dir: PathLike = "./work_dir",
    alpha: float = 0.5,
    quant_dtype: str = "int8",
    calib_dataset: str | None = None,
    calib_samples: int = 128,
    calib_seqlen: int = 2048,
    batch_size: int = 1,
    device: str = "auto",
    dtype: str = "auto",
    overwrite: bool = False,
) -> Path:
    """SmoothQuant (migration strength `alpha`) with per-channel int8 (or `quant_dtype="float8_e4m3fn"`) weights,
    for per-token dynamic activations at run time; LMDeploy's layout (`quant_method: smooth_quant`).
    Reuses the work dir's calibration statistics when they match."""
    import torch

    from lm_lite import smooth
    from lm_lite.checkpoint import write_checkpoint
    from lm_lite.model_io import decoder_layers, linear_at
    from lm_lite.walker import progress

    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if quant_dtype not in smooth.QUANT_DTYPES:
        raise ValueError(f"quant_dtype must be one of {', '.join(smooth.QUANT_DTYPES)}, got {quant_dtype!r}")
    calib = CalibOptions(calib_dataset, calib_samples, calib_seqlen, batch_size, device, dtype)
    job = prepare_job(model, work_dir, overwrite)
    stats, hf_model, _ = _stats(job, calib)
    config = _text_config(hf_model)
    layers_name, layers = decoder_layers(hf_model)
    quantized = {}
    with torch.no_grad():
        for index in progress(range(len(layers)), "smooth_quant: layers"):
            prefix = f"{layers_name}.{index}"
            absmax = {name: stats[f"{prefix}.{name}"]["absmax"] for name in job.family.linears}
            smooth.smooth_layer(layers[index], job.family, config, absmax, alpha)
            for name in job.family.linears:
                quantized[f"{prefix}.{name}"] = smooth.quantize_w8(linear_at(layers[index], name), quant_dtype)
    quantization_config = {"quant_method": "smooth_quant", "quant_dtype": quant_dtype, "alpha": alpha}
    return write_checkpoint(
        job.work_dir, hf_model, job.model_dir, job.config, quantized, "smooth_quant", quantization_config
    )


def calibrate(
    model: PathLike | None,
    work_dir: PathLike = "./work_dir",
    calib_dataset: str | None = None,
    calib_samples: int = 128,
    calib_seqlen: int = 2048,
    batch_size: int = 1,
    device: str = "auto",
    dtype: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Collect per-channel input statistics of every decoder linear; returns the saved statistics file."""
    from lm_lite.options import CALIBRATION_DIR
    from lm_lite.stats import STATS_FILE

    calib = CalibOptions(calib_dataset, calib_samples, calib_seqlen, batch_size, device, dtype)
    job = prepare_job(model, work_dir, overwrite)
    _stats(job, calib, reuse=False)
    return job.work_dir / CALIBRATION_DIR / STATS_FILE


def rtn(
    model: PathLike | None,
    work_dir: PathLike = "./work_dir",
    w_bits: int = 4,
    w_group_size: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Round-to-nearest baseline (no calibration), written in the AutoAWQ GEMM layout."""
    import torch

    from lm_lite.checkpoint import write_checkpoint
    from lm_lite.model_io import decoder_layers, linear_at, load_model
    from lm_lite.quant_math import quantize_groups

    check_bits(w_bits, (4,), "the AutoAWQ GEMM layout")
    check_group(w_group_size)
    job = prepare_job(model, work_dir, overwrite, w_group_size, pack_axis="out", grouped=True)
    hf_model, _ = load_model(job.model_dir, job.config, torch.float32)
    layers_name, layers = decoder_layers(hf_model)
    quantized = {}
    for index, layer in enumerate(layers):
        for name in job.family.linears:
            linear = linear_at(layer, name)
            q = quantize_groups(linear.weight.data, w_bits, job.grouped_size)
            q.bias = None if linear.bias is None else linear.bias.data.float()
            quantized[f"{layers_name}.{index}.{name}"] = q
    quantization_config = {
        "quant_method": "awq",
        "version": "gemm",
        "bits": w_bits,
        "group_size": job.group_size,
        "zero_point": True,
        "modules_to_not_convert": _not_converted(job),
    }
    return write_checkpoint(job.work_dir, hf_model, job.model_dir, job.config, quantized, "awq", quantization_config)


# -- shared ---------------------------------------------------------------------------------------------------------


def _quantize_walk(job: Job, calib: CalibOptions, method: str, quantize_layer, quantization_config: dict) -> Path:
    from lm_lite.checkpoint import write_checkpoint
    from lm_lite.walker import progress

    walker, hf_model = _walker(job, calib)
    config = _text_config(hf_model)
    quantized = {}
    for index in progress(range(walker.num_layers), f"{method}: layers"):
        for name, weight in quantize_layer(walker, index, hf_model, config).items():
            quantized[f"{walker.layer_name(index)}.{name}"] = weight
    del walker
    return write_checkpoint(job.work_dir, hf_model, job.model_dir, job.config, quantized, method, quantization_config)


def _walker(job: Job, calib: CalibOptions):
    from lm_lite.calib_data import load_texts, token_samples
    from lm_lite.model_io import load_model, resolve_device, resolve_dtype
    from lm_lite.walker import LayerWalker

    device = resolve_device(calib.device)
    dtype = resolve_dtype(calib.dtype, job.config, device)
    _say(f"calibration text: {calib.calib_dataset or 'builtin'}")
    texts = load_texts(calib.calib_dataset)
    _say(f"loading {job.model_dir} ({str(dtype).removeprefix('torch.')}, on the CPU; layers run on {device})")
    hf_model, tokenizer = load_model(job.model_dir, job.config, dtype)
    _say(f"tokenizing {calib.calib_samples} samples x {calib.calib_seqlen} tokens")
    samples = token_samples(tokenizer, texts, calib.calib_samples, calib.calib_seqlen)
    _say("capturing the first layer's inputs")
    return LayerWalker(hf_model, samples, device, calib.batch_size), hf_model


def _say(stage: str) -> None:
    """One line on stderr per stage before the per-layer progress bar, so that no stage passes in silence."""
    print(f"lm-lite: {stage}", file=sys.stderr, flush=True)


def _stats(job: Job, calib: CalibOptions, reuse: bool = True):
    """(stats, model, reused?) for `calibrate` and `smooth_quant`, from the work dir when they match."""
    import torch

    from lm_lite.model_io import load_model
    from lm_lite.stats import collect_stats, load_stats, save_stats

    meta = {
        "model": str(job.model_dir),
        "calib_dataset": calib.calib_dataset or "builtin",
        "calib_samples": calib.calib_samples,
        "calib_seqlen": calib.calib_seqlen,
        "dtype": calib.dtype,
    }
    stats = load_stats(job.work_dir, meta) if reuse else None
    if stats is not None:
        model, _ = load_model(job.model_dir, job.config, torch.float32)
        return stats, model, True
    walker, model = _walker(job, calib)
    stats = collect_stats(walker, job.family)
    del walker
    save_stats(job.work_dir, stats, meta)
    return stats, model, False


def _text_config(hf_model):
    config = hf_model.config
    return getattr(config, "text_config", None) or config


def _not_converted(job: Job) -> list[str] | None:
    """Parts of a multimodal checkpoint that stay in floating point (the vision tower and its projector)."""
    if job.config.get("architectures", [None])[0] == "Gemma3ForConditionalGeneration":
        return ["vision_tower", "multi_modal_projector"]
    return None
