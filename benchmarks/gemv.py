"""Batch-1 linear layers of Llama-3-8B on a GPU: cuBLAS(Lt) through torch against a Triton GEMV candidate.

At batch 1 a decode step is matrix-vector products bound by reading the weights; this times each projection shape
(bf16, one input row) as CUDA-graph replays over enough weight copies that none stays in L2, and prints the read
bandwidth. Candidates: torch's default BLAS, torch with `preferred_blas_library("cublas")`, and
`lm_torch.kernels.gemv` at a few launch shapes.

    python benchmarks/gemv.py
"""

from __future__ import annotations

import json

import torch

# (name, out_features, in_features) of Llama-3-8B's projections (q/k/v and gate/up fused, as lm-torch runs them).
SHAPES = [
    ("qkv", 6144, 4096),
    ("o", 4096, 4096),
    ("gate_up", 28672, 4096),
    ("down", 4096, 14336),
    ("lm_head", 128256, 4096),
]
L2_BYTES = 50 * 1024**2


def time_us(fn, weights, x, rep: int = 200) -> float:
    """Median microseconds of fn(x, w) per weight copy, as CUDA-graph replays over all the copies."""
    import triton.testing

    def run():
        for w in weights:
            fn(x, w)

    return triton.testing.do_bench_cudagraph(run, rep=rep, return_mode="median") * 1000 / len(weights)


def main() -> None:
    from lm_torch.kernels.gemv import gemv

    torch.manual_seed(0)
    rows = []
    for name, n, k in SHAPES:
        copies = max(2, -(-4 * L2_BYTES // (n * k * 2)))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        reference = torch.nn.functional.linear(x.float(), weights[0].float())
        gigabytes = n * k * 2 / 1e9
        row = {"shape": name, "n": n, "k": k}
        torch.backends.cuda.preferred_blas_library("cublaslt")
        row["cublaslt_us"] = round(time_us(torch.nn.functional.linear, weights, x), 2)
        torch.backends.cuda.preferred_blas_library("cublas")
        row["cublas_us"] = round(time_us(torch.nn.functional.linear, weights, x), 2)
        torch.backends.cuda.preferred_blas_library("cublaslt")
        for block_n, block_k, warps, split in [(16, 512, 4, 1), (32, 256, 4, 1), (16, 256, 4, 2), (64, 128, 8, 1)]:

            def candidate(a, w, bn=block_n, bk=block_k, nw=warps, sk=split):
                return gemv(a, w, block_n=bn, block_k=bk, num_warps=nw, split_k=sk)

            error = (candidate(x, weights[0]).float() - reference).abs().max().item()
            row[f"triton_{block_n}x{block_k}w{warps}s{split}_us"] = round(time_us(candidate, weights, x), 2)
            row[f"triton_{block_n}x{block_k}w{warps}s{split}_err"] = round(error, 4)
        best = min(v for key, v in row.items() if key.endswith("_us"))
        row["best_TBps"] = round(gigabytes / (best * 1e-6) / 1000, 2)
        row["cublaslt_TBps"] = round(gigabytes / (row["cublaslt_us"] * 1e-6) / 1000, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
