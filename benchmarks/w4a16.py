"""W4A16 (and W8A8) linear layers at Llama-3-8B's shapes on a GPU: launch shapes of the Triton kernels against cuBLAS.

For each projection (q/k/v and gate/up fused, as lm-torch runs them) and each row count M (1, 2, 4, 8, 16: decode
batches; 2048: a prefill chunk) this times `kernels.w4a16` at a few launch shapes, the dispatcher `w4a16_linear`
lm-torch calls, cuBLAS bf16 on the dense weight, and (M = 1) the bf16 Triton GEMV, as CUDA-graph replays over enough
weight copies that none stays in L2. It prints one JSON line per (shape, M): microseconds per candidate, the
effective bandwidth of the best W4A16 one (int4 weight + bf16 scales and zeros, read once) and its largest error
against the float32 dequantize-and-multiply reference. W8A8 lines time the per-token quantization + int8 GEMM.

    python benchmarks/w4a16.py [--quick]
"""

from __future__ import annotations

import argparse
import json

import torch

SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
GROUP = 128
L2_BYTES = 50 * 1024**2
# (block_n, blocks per step, num_warps, num_stages, split_k) of the one-row GEMV.
GEMV_SHAPES = [
    (8, 16, 2, 1, 1),
    (16, 16, 2, 1, 1),
    (4, 16, 2, 1, 1),
    (8, 16, 2, 1, 2),
    (16, 16, 4, 1, 1),
    (8, 16, 4, 1, 1),
    (32, 16, 4, 1, 1),
    (16, 8, 4, 1, 2),
    (64, 4, 4, 1, 4),
]
# (block_m, block_n, num_warps, num_stages, split_k) of the tensor-core kernel.
SKINNY_SHAPES = [(16, 64, 4, 3, 1), (16, 64, 4, 3, 4), (16, 32, 4, 4, 4), (16, 128, 4, 3, 2)]
PREFILL_SHAPES = [(128, 128, 8, 3, 1), (128, 64, 4, 4, 1), (64, 128, 4, 4, 1), (128, 256, 8, 3, 1)]


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
    parser.add_argument("--quick", action="store_true", help="fewer launch shapes and a shorter timing per shape")
    parser.add_argument("--rows", default="1,2,4,8,16,2048")
    args = parser.parse_args()
    from lm_torch.kernels import reference
    from lm_torch.kernels.gemv import gemv
    from lm_torch.kernels.w4a16 import w4a16_gemm, w4a16_gemv, w4a16_linear

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
            candidates = {"dispatch": lambda a, w: w4a16_linear(a, *w, GROUP)}
            if m == 1:
                for bn, nb, nw, ns, sk in GEMV_SHAPES:
                    candidates[f"gemv_{bn}b{nb}w{nw}n{ns}s{sk}"] = lambda a, w, bn=bn, nb=nb, nw=nw, ns=ns, sk=sk: (
                        w4a16_gemv(a, *w, GROUP, block_n=bn, blocks=nb, num_warps=nw, num_stages=ns, split_k=sk)
                    )
            shapes = SKINNY_SHAPES if m <= 16 else PREFILL_SHAPES
            for bm, bn, nw, ns, sk in shapes[: 2 if args.quick else None]:
                candidates[f"gemm_{bm}x{bn}w{nw}n{ns}s{sk}"] = lambda a, w, bm=bm, bn=bn, nw=nw, ns=ns, sk=sk: (
                    w4a16_gemm(a, *w, GROUP, block_m=bm, block_n=bn, num_warps=nw, num_stages=ns, split_k=sk)
                )
            for label, fn in candidates.items():
                try:
                    error = (fn(x, weights[0]).float() - expected).abs().max().item()
                    row[f"{label}_us"] = round(time_us(fn, weights, x, rep), 2)
                    row[f"{label}_err"] = round(error, 4)
                except Exception as exc:  # a launch shape that does not compile is a result too
                    row[f"{label}_failed"] = f"{type(exc).__name__}: {str(exc)[:120]}"
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
