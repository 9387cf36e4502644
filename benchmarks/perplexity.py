"""Perplexity of quantized checkpoints run by lm-torch, on held-out English text (issue #7).

Quantizes the model with lm-lite (RTN, AWQ, GPTQ, SmoothQuant W8A8, blocked FP8) into --out-dir, loads every
checkpoint with lm-torch's loader (the engine's model code, on the CPU in float32), and computes perplexity over
non-overlapping windows of --seqlen tokens of --text (each window scored on its own, first token unscored).

    python benchmarks/perplexity.py --group-size 64 --calib-samples 16 --calib-seqlen 512 \
        --out-dir /tmp/ppl --json /tmp/ppl/results.json

Prints a Markdown table. The held-out text (`tests/lm_lite/data/heldout.txt`) is not the calibration text (lm-lite's
built-in set, or --calib-dataset). `--quant-policy 8` (int8) or `4` (int4) runs every variant with the KV cache
quantized online (lm-torch's `quant_policy`): `--variants fp32 --quant-policy 8` gives the "KV int8" row.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
DEFAULT_TEXT = HERE.parent / "tests" / "lm_lite" / "data" / "heldout.txt"
VARIANTS = ("fp32", "rtn", "awq", "gptq", "w8a8", "fp8")


def heldout_ids(model_dir: Path, text_path: Path) -> list[int]:
    """The held-out text as token ids (no special tokens)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.model_max_length = 1 << 62
    return tokenizer(text_path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]


def perplexity(
    model_dir: Path,
    ids: list[int],
    seqlen: int,
    max_windows: int | None = None,
    quant_policy: int = 0,
    dtype: str = "float32",
) -> float:
    """exp(mean negative log-likelihood) of lm-torch's model over windows of `seqlen` tokens (the KV cache
    quantized as `quant_policy` says: 0 off, 8 int8, 4 int4), computed in `dtype` (float32 or bfloat16)."""
    import torch

    compute = getattr(torch, dtype)
    from lm_torch.attention import StepMetadata, TorchAttentionBackend
    from lm_torch.config import TorchEngineConfig
    from lm_torch.kv_quant import allocate_kv_cache
    from lm_torch.loader import build_model, load_hf_config

    model = build_model(
        model_dir,
        TorchEngineConfig(),
        load_hf_config(model_dir),
        torch.device("cpu"),
        compute,
        TorchAttentionBackend(),
    )
    block_size = 16
    num_blocks = (seqlen + block_size - 1) // block_size
    caches = [
        allocate_kv_cache(num_blocks, block_size, h, d, quant_policy, compute, "cpu") for h, d in model.kv_cache_shape()
    ]
    windows = [ids[i : i + seqlen] for i in range(0, len(ids) - seqlen + 1, seqlen)][:max_windows]
    if not windows:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {seqlen}")
    total_nll, count = 0.0, 0
    meta = model.prepare_attention(StepMetadata.build([seqlen], [seqlen], [list(range(num_blocks))], block_size, "cpu"))
    with torch.no_grad():
        for window in windows:
            tokens = torch.tensor(window)
            logits = model.compute_logits(model(tokens, torch.arange(seqlen), caches, meta)).float()
            nll = torch.nn.functional.cross_entropy(logits[:-1], tokens[1:], reduction="sum")
            total_nll += nll.item()
            count += seqlen - 1
    return math.exp(total_nll / count)


def build_variant(variant: str, model_dir: Path, out_dir: Path, args) -> Path:
    """The checkpoint directory of one variant (quantizing it with lm-lite unless it is fp32)."""
    import lm_lite

    if variant == "fp32":
        return model_dir
    work = out_dir / variant
    calib = {
        "calib_dataset": args.calib_dataset,
        "calib_samples": args.calib_samples,
        "calib_seqlen": args.calib_seqlen,
        "overwrite": True,
    }
    if variant == "rtn":
        return lm_lite.rtn(model_dir, work, w_group_size=args.group_size, overwrite=True)
    if variant == "awq":
        return lm_lite.auto_awq(model_dir, work, w_group_size=args.group_size, **calib)
    if variant == "gptq":
        return lm_lite.auto_gptq(
            model_dir,
            work,
            w_group_size=args.group_size,
            desc_act=args.desc_act,
            sym=args.gptq_sym,
            damp_percent=args.damp_percent,
            **calib,
        )
    if variant == "w8a8":
        return lm_lite.smooth_quant(model_dir, work, **calib)
    if variant == "fp8":
        from lm_lite.fp8 import quantize_fp8

        return quantize_fp8(model_dir, work, overwrite=True)
    raise ValueError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")


def run(args) -> dict[str, dict]:
    from lm_core import resolve_model

    model_dir = resolve_model(args.model)
    ids = heldout_ids(model_dir, Path(args.text))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for variant in args.variants:
        start = time.perf_counter()
        checkpoint = build_variant(variant, model_dir, out_dir, args)
        quantize_seconds = time.perf_counter() - start
        ppl = perplexity(checkpoint, ids, args.seqlen, args.max_windows, args.quant_policy, args.dtype)
        results[variant] = {
            "perplexity": ppl,
            "quantize_seconds": quantize_seconds,
            "quant_policy": args.quant_policy,
            "dtype": args.dtype,
        }
        print(f"{variant}: perplexity {ppl:.3f} (quantized in {quantize_seconds:.0f} s)", file=sys.stderr)
    return results


def table(results: dict[str, dict], args) -> str:
    group_size = args.group_size
    gptq = ", ".join(
        (["act-order"] if args.desc_act else [])
        + ["symmetric" if args.gptq_sym else "asymmetric", f"damp {args.damp_percent:g}"]
    )
    names = {
        "fp32": "fp32" if args.dtype == "float32" else f"unquantized ({args.dtype})",
        "rtn": f"RTN w4g{group_size}",
        "awq": f"AWQ w4g{group_size}",
        "gptq": f"GPTQ w4g{group_size} ({gptq})",
        "w8a8": "W8A8 (SmoothQuant int8)",
        "fp8": "FP8 blocked 128x128 (e4m3, weights)",
    }
    fp32 = results.get("fp32", {})
    # A ratio against fp32 only where fp32 ran with a float KV cache (with --quant-policy, every row is quantized).
    base = fp32.get("perplexity") if not fp32.get("quant_policy") else None
    first = "fp32" if args.dtype == "float32" else args.dtype
    lines = [f"| variant | perplexity | vs {first} |", "|---|---|---|"]
    for variant, entry in results.items():
        ratio = f"{100 * (entry['perplexity'] / base - 1):+.1f}%" if base else ""
        kv = f", KV int{entry['quant_policy']}" if entry.get("quant_policy") else ""
        lines.append(f"| {names[variant]}{kv} | {entry['perplexity']:.3f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Model (default: SmolLM2-135M-Instruct).")
    parser.add_argument("--text", default=str(DEFAULT_TEXT), help="Held-out text.")
    parser.add_argument("--variants", default=",".join(VARIANTS), type=lambda s: s.split(","))
    parser.add_argument("--group-size", default=64, type=int, help="SmolLM2's hidden size 576 is no multiple of 128.")
    parser.add_argument("--calib-dataset", default=None)
    parser.add_argument("--calib-samples", default=16, type=int)
    parser.add_argument("--calib-seqlen", default=512, type=int)
    parser.add_argument(
        "--gptq-sym", action=argparse.BooleanOptionalAction, default=False, help="Symmetric GPTQ grid (RTN/AWQ: asym)."
    )
    parser.add_argument(
        "--desc-act", action=argparse.BooleanOptionalAction, default=True, help="GPTQ act-order (lm-lite's default)."
    )
    parser.add_argument("--damp-percent", default=0.01, type=float, help="GPTQ damping (see docs/quantization.md).")
    parser.add_argument("--seqlen", default=512, type=int, help="Tokens per scored window.")
    parser.add_argument("--max-windows", default=None, type=int)
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype of every variant (CPU)"
    )
    parser.add_argument(
        "--quant-policy", default=0, type=int, choices=(0, 4, 8), help="KV cache: 0 as the model, 8 int8, 4 int4."
    )
    parser.add_argument("--out-dir", default="/tmp/lm-lite-perplexity")
    parser.add_argument("--json", default=None, help="Also write the results here.")
    args = parser.parse_args()
    results = run(args)
    print(table(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
