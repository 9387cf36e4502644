"""Small-batch linear layers of Llama-3-8B on a GPU: cuBLAS(Lt) through torch against Triton candidates.

At small batches a decode step is matrix products bound by reading the weights; this times each projection shape
(bf16) as CUDA-graph replays over enough weight copies that none stays in L2, and prints the read bandwidth.
One row (default): torch's default BLAS, torch with `preferred_blas_library("cublas")`, and `lm_torch.kernels.gemv`
at a few launch shapes. `--rows 2 8 16 32 64`: cuBLASLt against `kernels.gemv.skinny_gemm` at its launch shapes;
with `--write-tuning FILE` the fastest of each (rows, shape) goes to the table `kernels.gemv.skinny_config` reads
(null where cuBLASLt won).

    python benchmarks/gemv.py
    python benchmarks/gemv.py --rows 2 8 16 32 64 [--write-tuning FILE]
"""

from __future__ import annotations

import argparse
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


def time_us(fn, weights, x) -> float:
    import triton.testing

    def run():
        for w in weights:
            fn(x, w)

    return triton.testing.do_bench_cudagraph(run, rep=200, return_mode="median") * 1000 / len(weights)


# skinny_gemm launch shapes: (block_n, block_k, num_warps, num_stages, split_k).
SKINNY_SHAPES = [
    (32, 128, 4, 4, 1),
    (32, 256, 4, 3, 1),
    (64, 128, 4, 4, 1),
    (64, 128, 4, 6, 1),
    (64, 256, 4, 3, 1),
    (64, 128, 4, 4, 2),
    (128, 128, 8, 4, 1),
    (128, 64, 4, 5, 1),
]


def skinny_rows(row_counts: list[int], tuning_path: str | None) -> None:
    from lm_torch.kernels.gemv import SKINNY_LAUNCH_KEYS, skinny_gemm

    torch.manual_seed(0)
    table: dict[str, list | None] = {}
    for name, n, k in SHAPES:
        copies = max(2, -(-4 * L2_BYTES // (n * k * 2)))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        gigabytes = n * k * 2 / 1e9
        for m in row_counts:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            reference = torch.nn.functional.linear(x.float(), weights[0].float())
            row = {"shape": name, "rows": m, "cublaslt_us": round(time_us(torch.nn.functional.linear, weights, x), 2)}
            best = ("cublaslt", row["cublaslt_us"], None)
            for launch in SKINNY_SHAPES:
                bn, bk, nw, ns, sk = launch

                def candidate(a, w, bn=bn, bk=bk, nw=nw, ns=ns, sk=sk):
                    return skinny_gemm(a, w, block_n=bn, block_k=bk, num_warps=nw, num_stages=ns, split_k=sk)

                label = f"{bn}x{bk}w{nw}s{ns}k{sk}"
                error = (candidate(x, weights[0]).float() - reference).abs().max().item()
                if error > 0.05 * (1 + reference.abs().max().item()):
                    row[label] = f"wrong (max error {error:.3g})"
                    continue
                row[label] = round(time_us(candidate, weights, x), 2)
                if row[label] < best[1]:
                    best = (label, row[label], launch)
            row["best"] = best[0]
            table[f"{m}:{n}:{k}"] = None if best[2] is None else dict(zip(SKINNY_LAUNCH_KEYS, best[2], strict=True))
            if tuning_path:  # after every row: a sweep cut short still leaves its table
                with open(tuning_path, "w") as f:
                    device = torch.cuda.get_device_name()
                    json.dump({"device": device, "torch": torch.__version__, "configs": table}, f, indent=1)
            row["cublaslt_TBps"] = round(gigabytes / (row["cublaslt_us"] * 1e-6) / 1000, 2)
            row["best_TBps"] = round(gigabytes / (best[1] * 1e-6) / 1000, 2)
            print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="*", help="row counts above 1: cuBLASLt against skinny_gemm")
    parser.add_argument("--write-tuning", default=None, help="with --rows: write the fastest launches here (JSON)")
    args = parser.parse_args()
    if args.rows:
        skinny_rows(args.rows, args.write_tuning)
        return
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
