"""W4A16 (and W8A8) linear layers at Llama-3-8B's shapes on a GPU: launch shapes of the Triton kernels against cuBLAS.

For each projection (q/k/v and gate/up fused, as lm-torch runs them) and each row count M (1, 2, 4, 8, 16: decode
batches; 2048: a prefill chunk) this times `kernels.w4a16` at a few launch shapes, the dispatcher `w4a16_linear`
lm-torch calls, cuBLAS bf16 on the dense weight, and (M = 1) the bf16 Triton GEMV, as CUDA-graph replays over enough
weight copies that none stays in L2. It prints one JSON line per (shape, M): microseconds per candidate, the
effective bandwidth of the best W4A16 one (int4 weight + bf16 scales and zeros, read once) and each candidate's
largest error against the float32 dequantize-and-multiply reference; a candidate that fails to compile or computes
a wrong result (`*_failed`) is not timed, so it never enters the table. W8A8 lines time the per-token quantization
+ int8 GEMM.

    python benchmarks/w4a16.py [--quick] [--rows 1,4,16,2048] [--write-tuning FILE]

--write-tuning writes the fastest launch shape of each (rows bucket, N, K, group) as the JSON table
`kernels.w4a16.tuned_configs` reads (from $LM_TORCH_W4A16_TUNING, else `kernels/w4a16_tuning.json`).
"""

from __future__ import annotations

import argparse
import json

import torch

SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
GROUP = 128
L2_BYTES = 50 * 1024**2
# Launch shapes tried: (block_n, blocks per step, num_warps, split_k, prefetch, prefetch_x) of the one-row GEMV.
GEMV = [  # five of the 15 shapes of the 2026-11-25 sweep, its winner (kernels/w4a16_tuning.json) first
    (4, 8, 1, 1, True, True),
    (8, 8, 1, 1, True, True),
    (2, 8, 1, 1, True, True),
    (4, 16, 2, 1, True, True),
    (4, 8, 1, 2, True, True),
]
GEMV_CONFIGS = [
    dict(zip(("block_n", "blocks", "num_warps", "split_k", "prefetch", "prefetch_x"), c, strict=True)) for c in GEMV
]
# (block_n, blocks per step, num_warps, split_k, prefetch) of the tensor-core GEMV (`w4a16_gemv_tc`). One warp a
# program keeps the operands in registers (SASS: no shared memory for the weights, LDG.128 words); split-K gives the
# N = 4096 shapes enough programs (64 rows: 64 of them unsplit).
GEMV_TC = [
    (16, 1, 1, 1, True),
    (16, 2, 1, 1, True),
    (16, 4, 1, 1, True),
    (32, 1, 1, 1, True),
    (32, 2, 1, 1, True),
    (64, 1, 1, 1, True),
    # Split-K (reduced in the kernel): about 2,000 one-warp programs fill the H100's 132 SMs with enough bytes in
    # flight; N = 4096 at 16 rows a program is 256 programs unsplit.
    (16, 1, 1, 8, True),
    (16, 2, 1, 2, True),
    (16, 2, 1, 4, True),
    (16, 2, 1, 8, True),
    (16, 4, 1, 2, True),
    (16, 4, 1, 4, True),
    (16, 4, 1, 8, True),
    (32, 1, 1, 4, True),
    (32, 2, 1, 4, True),
    (32, 2, 1, 8, True),
    (64, 1, 1, 8, True),
]
GEMV_TC_CONFIGS = [
    dict(zip(("block_n", "blocks", "num_warps", "split_k", "prefetch"), c, strict=True)) for c in GEMV_TC
]
# (block_m, block_n, num_warps, num_stages, split_k, prefetch) of the tensor-core kernel: a few rows, and prefill.
_GEMM_KEYS = ("block_m", "block_n", "num_warps", "num_stages", "split_k", "prefetch")
SKINNY_CONFIGS = [
    dict(zip(_GEMM_KEYS, c, strict=True))
    for c in [
        (16, 64, 4, 3, 4, False),
        (16, 64, 4, 3, 4, True),
        (16, 32, 4, 3, 4, True),
        (16, 64, 4, 3, 2, True),
        (16, 128, 4, 3, 2, True),
        (16, 64, 4, 3, 8, True),
    ]
]
PREFILL_CONFIGS = [
    dict(zip(_GEMM_KEYS, c, strict=True))
    for c in [
        (128, 64, 4, 4, 1, False),
        (128, 128, 8, 3, 1, False),
        (64, 128, 4, 4, 1, False),
        (128, 64, 4, 3, 1, True),
    ]
]


def time_us(fn, operands, x, rep: int) -> float:
    import triton.testing

    def run():
        for op in operands:
            fn(x, op)

    return triton.testing.do_bench_cudagraph(run, rep=rep, return_mode="median") * 1000 / len(operands)


def make_weights(n: int, k: int, copies: int):
    from lm_torch.kernels.w4a16 import pack_int4

    out = []
    for _ in range(copies):
        q = torch.randint(0, 16, (n, k), device="cuda")
        scales = (torch.rand(k // GROUP, n, device="cuda") * 0.002 + 0.001).to(torch.bfloat16)
        zeros = torch.full((k // GROUP, n), 8.0, device="cuda", dtype=torch.bfloat16)
        out.append((pack_int4(q, GROUP), scales, zeros))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a shorter timing per launch shape")
    parser.add_argument("--rows", default="1,2,4,8,16,2048")
    parser.add_argument("--write-tuning", default=None, help="write the fastest launch shapes here (JSON)")
    args = parser.parse_args()
    from lm_torch.kernels import reference
    from lm_torch.kernels.gemv import gemv
    from lm_torch.kernels.w4a16 import (
        rows_bucket,
        w4a16_dequantize,
        w4a16_gemm,
        w4a16_gemv,
        w4a16_gemv_tc,
        w4a16_linear,
    )

    table: dict[str, dict] = {}

    rep = 60 if args.quick else 150
    torch.manual_seed(0)
    for name, n, k in SHAPES:
        w4_bytes = n * k // 2 + 2 * (k // GROUP) * n * 2
        copies = max(2, -(-4 * L2_BYTES // w4_bytes))
        weights = make_weights(n, k, copies)
        packed, scales, zeros = weights[0]
        zero_cols = zeros.float().t().repeat_interleave(GROUP, 1)  # [N, K]
        scale_cols = scales.float().t().repeat_interleave(GROUP, 1)
        w = ((reference.unpack_int4(packed, GROUP).float() - zero_cols) * scale_cols).to(
            torch.bfloat16
        )  # the same weight
        dense = [w.clone() for _ in range(max(2, -(-4 * L2_BYTES // (n * k * 2))))]
        del zero_cols, scale_cols
        for m in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            expected = reference.w4a16_linear(x, *weights[0], GROUP)
            row = {"shape": name, "n": n, "k": k, "m": m}
            candidates = {"dispatch": (None, lambda a, w: w4a16_linear(a, *w, GROUP))}
            if m == 1:
                for cfg in GEMV_CONFIGS:
                    label = "gemv_" + "_".join(f"{key}{int(value)}" for key, value in cfg.items())
                    candidates[label] = ({"kernel": "gemv", **cfg}, lambda a, w, c=cfg: w4a16_gemv(a, *w, GROUP, **c))
                for cfg in GEMV_TC_CONFIGS:
                    label = "gemv_tc_" + "_".join(f"{key}{int(value)}" for key, value in cfg.items())
                    candidates[label] = (
                        {"kernel": "gemv_tc", **cfg},
                        lambda a, w, c=cfg: w4a16_gemv_tc(a, *w, GROUP, **c),
                    )
            for cfg in (SKINNY_CONFIGS if m <= 16 else PREFILL_CONFIGS)[: 2 if m == 1 else None]:
                label = "gemm_" + "_".join(f"{key}{int(value)}" for key, value in cfg.items())
                candidates[label] = ({"kernel": "gemm", **cfg}, lambda a, w, c=cfg: w4a16_gemm(a, *w, GROUP, **c))
            if m > 64:
                candidates["dequant_cublas"] = (
                    {"kernel": "dequant"},
                    lambda a, w: torch.nn.functional.linear(a, w4a16_dequantize(*w, GROUP)),
                )
            # bf16 output rounding is ~0.01 here (outputs of order one): ten times that is a wrong result.
            max_error = 0.1 * max(1.0, expected.abs().max().item())
            for label, (_, fn) in candidates.items():
                try:
                    error = (fn(x, weights[0]).float() - expected).abs().max().item()
                    row[f"{label}_err"] = round(error, 4)
                    if not error <= max_error:  # NaN too: a wrong candidate is not timed, so it cannot win
                        row[f"{label}_failed"] = f"wrong: max error {error:.4g} > {max_error:.4g}"
                        continue
                    row[f"{label}_us"] = round(time_us(fn, weights, x, rep), 2)
                except Exception as exc:  # a launch shape that does not compile is a result too
                    row[f"{label}_failed"] = f"{type(exc).__name__}: {str(exc)[:120]}"
            # Only launch shapes that computed the right numbers were timed, so any of them may be chosen.
            tuned = {key: v for key, v in row.items() if key.endswith("_us") and key != "dispatch_us"}
            if tuned:
                label = min(tuned, key=tuned.get).removesuffix("_us")
                # Later row counts of a bucket overwrite earlier ones: the bucket's largest M decides.
                table[f"{rows_bucket(m)}:{n}:{k}:{GROUP}"] = candidates[label][0]
                if args.write_tuning:  # after every row: a sweep cut short still leaves its table
                    with open(args.write_tuning, "w") as f:
                        device = torch.cuda.get_device_name()
                        json.dump({"device": device, "torch": torch.__version__, "configs": table}, f, indent=1)
            row["cublas_bf16_us"] = round(time_us(torch.nn.functional.linear, dense, x, rep), 2)
            if m == 1:
                row["gemv_bf16_us"] = round(time_us(lambda a, w: gemv(a, w), dense, x, rep), 2)
            timed = {key: v for key, v in row.items() if key.endswith("_us") and "bf16" not in key}
            best = min(timed, key=timed.get)
            row["best"] = best
            row["best_w4_GBps"] = round(w4_bytes / (timed[best] * 1e-6) / 1e9, 1)
            row["speedup_vs_cublas_bf16"] = round(row["cublas_bf16_us"] / timed[best], 2)
            print(json.dumps(row), flush=True)
    w8a8_lines(rep)


def w8a8_lines(rep: int) -> None:
    from lm_torch.kernels.w8a8 import int8_gemm, quantize_per_token

    for name, n, k in SHAPES[2:3]:
        copies = max(2, -(-4 * L2_BYTES // (n * k)))
        weights = [torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8) for _ in range(copies)]
        w_scale = torch.rand(n, 1, device="cuda") * 0.001
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(max(2, copies // 2))]
        for m in (1, 16, 2048):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)

            def w8a8(a, w, w_scale=w_scale):
                a_q, a_scale = quantize_per_token(a)
                return int8_gemm(a_q, a_scale, w, w_scale, None, torch.bfloat16)

            row = {"w8a8": name, "m": m, "n": n, "k": k}
            row["w8a8_us"] = round(time_us(w8a8, weights, x, rep), 2)
            row["cublas_bf16_us"] = round(time_us(torch.nn.functional.linear, dense, x, rep), 2)
            row["w8a8_GBps"] = round(n * k / (row["w8a8_us"] * 1e-6) / 1e9, 1)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
