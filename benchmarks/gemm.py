"""Linear layers of Llama-3-8B at decode-step row counts on a GPU: cuBLASLt against lm-torch's Triton GEMMs.

Times y = x @ W^T (bf16) for each projection shape and row count as CUDA-graph replays over enough weight copies
that none stays in L2, for cuBLASLt (torch's default), `cublas_wxT` (`kernels.gemm.transposed_cublas_gemm`: cuBLAS
on the transposed problem, y^T = W x^T, and the copy back to rows, which cuBLAS tiles differently),
`kernels.gemv.skinny_gemm` (up to 64 rows), `kernels.gemm.tiled_gemm` and `kernels.gemm.tma_gemm` (TMA loads,
split-K where the output tiles are few; from 64 rows) at a few launch shapes each (`--kernels` picks which), checks
every candidate against a float32 product, and prints the time, the read bandwidth and the FLOP rate of the
fastest. The gate_up shape is also timed with the SiLU and product after it: cuBLASLt followed by the engine's
activation kernel against the tiled and TMA GEMMs with the activation fused (key `rows:N:K:silu`). With
--write-tuning the fastest launch of each (rows, shape) goes to the table `kernels.gemm.gemm_launch` reads (null
where cuBLASLt won), merged into the file's entries for the keys this run does not measure when the file was
measured on this card (or names none).

    python benchmarks/gemm.py [--rows 2 16 64 128 192 256] [--kernels tma ...] [--write-tuning FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from gemv import L2_BYTES, SHAPES, time_us  # benchmarks/ is the script's directory, hence on sys.path

SKINNY_MAX_ROWS = 64
SKINNY = [  # (block_n, block_k, num_warps, num_stages, split_k)
    (64, 256, 4, 3, 1),
    (64, 128, 4, 4, 1),
    (128, 128, 8, 4, 1),
]
TILED_MIN_ROWS = 32
TILED = [  # (block_m, block_n, block_k, num_warps, num_stages)
    (64, 128, 64, 4, 4),
    (64, 256, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (128, 128, 64, 8, 3),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
]
GATED = [  # tiled launches with the activation fused (two accumulators: narrower feature tiles)
    (64, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 8, 3),
    (128, 128, 64, 8, 3),
]
TMA_MIN_ROWS = 64
TMA = [  # (block_m, block_n, block_k, num_warps, num_stages, split_k); splits only where the tiles are few
    (64, 128, 64, 4, 4, 1),
    (64, 128, 64, 4, 4, 2),
    (64, 128, 64, 4, 4, 4),
    (128, 64, 64, 4, 4, 1),
    (128, 64, 64, 4, 4, 2),
    (128, 128, 64, 8, 4, 1),
    (128, 128, 64, 8, 4, 2),
    (128, 128, 64, 8, 4, 4),
    (128, 256, 64, 8, 3, 1),
    (256, 128, 64, 8, 3, 1),
    (256, 128, 64, 8, 3, 2),
]
TMA_GATED = [
    (64, 128, 64, 4, 4, 1),
    (128, 64, 64, 8, 4, 1),
    (128, 64, 64, 8, 4, 2),
    (128, 128, 64, 8, 3, 1),
    (256, 64, 64, 8, 3, 1),
]
SPLIT_MAX_TILES = 256  # a split pays only while the tiles are too few to fill the SMs


def tma_launches(rows: int, n: int, gated: bool):
    """The TMA kernel's launches at `rows` x `n` outputs: splits of K only where the output tiles are few."""
    for launch in TMA_GATED if gated else TMA:
        block_m, block_n, split_k = launch[0], launch[1], launch[5]
        tiles = -(-rows // block_m) * -(-(n // 2 if gated else n) // block_n)
        if split_k == 1 or (tiles * split_k <= 2 * SPLIT_MAX_TILES and tiles < SPLIT_MAX_TILES):
            yield launch


KERNELS = ("cublas_t", "skinny", "tiled", "tma")


def candidates(rows: int, n: int, gated: bool, kernels=KERNELS):
    """(label, table entry, function, keyword arguments) of every launch of `kernels` tried at `rows` rows of an
    `n`-feature weight besides cuBLASLt."""
    for candidate in _candidates(rows, n, gated):
        if candidate[1]["kernel"] in kernels:
            yield candidate


def _candidates(rows: int, n: int, gated: bool):
    from lm_torch.kernels.gemm import LAUNCH_KEYS, tiled_gemm, tma_gemm, transposed_cublas_gemm
    from lm_torch.kernels.gemv import skinny_gemm

    if rows >= TMA_MIN_ROWS and torch.cuda.get_device_capability() >= (9, 0):  # TMA: Hopper and later
        for launch in tma_launches(rows, n, gated):
            kwargs = dict(zip(LAUNCH_KEYS["tma"], launch, strict=True))
            entry = {"kernel": "tma", **kwargs}
            label = "tma" + ("+silu " if gated else " ") + "/".join(map(str, launch))
            yield label, entry, tma_gemm, {**kwargs, "activation": "silu"} if gated else kwargs
    if gated:
        for launch in GATED:
            kwargs = dict(zip(LAUNCH_KEYS["tiled"], launch, strict=True))
            entry = {"kernel": "tiled", **kwargs}
            yield "tiled+silu " + "/".join(map(str, launch)), entry, tiled_gemm, {**kwargs, "activation": "silu"}
        return
    yield "cublas_wxT", {"kernel": "cublas_t"}, transposed_cublas_gemm, {}
    if rows <= SKINNY_MAX_ROWS:
        for launch in SKINNY:
            kwargs = dict(zip(LAUNCH_KEYS["skinny"], launch, strict=True))
            yield "skinny " + "/".join(map(str, launch)), {"kernel": "skinny", **kwargs}, skinny_gemm, kwargs
    if rows >= TILED_MIN_ROWS:
        for launch in TILED:
            kwargs = dict(zip(LAUNCH_KEYS["tiled"], launch, strict=True))
            yield "tiled " + "/".join(map(str, launch)), {"kernel": "tiled", **kwargs}, tiled_gemm, kwargs


def cublas_then_silu(x, w):
    from lm_torch.kernels.activation import gated_activation

    return gated_activation(torch.nn.functional.linear(x, w), "silu")


def by_shape_then_rows(table: dict[str, dict | None]) -> dict[str, dict | None]:
    """The table's `rows:N:K[:act]` entries grouped by shape (in first-seen order), rows ascending in each."""
    shapes = list(dict.fromkeys(key.split(":", 1)[1] for key in table))
    return dict(sorted(table.items(), key=lambda e: (shapes.index(e[0].split(":", 1)[1]), int(e[0].split(":")[0]))))


def main() -> None:
    import triton

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[2, 16, 64, 128, 192, 256])
    parser.add_argument("--write-tuning", default=None, help="merge the fastest launches into this file (JSON)")
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS), help="candidates to time")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    table: dict[str, dict | None] = {}
    if args.write_tuning and Path(args.write_tuning).is_file():
        existing = json.loads(Path(args.write_tuning).read_text())
        if existing.get("device") in (None, device):  # another card's winners are not this one's: start fresh
            table.update(existing["configs"])
    runs = []
    for name, n, k in SHAPES:
        runs.append((name, n, k, False))
        if name == "gate_up":  # then the same weights with the activation after the product
            runs.append(("gate_up+silu", n, k, True))
    weights_of: dict[tuple[int, int], list[torch.Tensor]] = {}
    for name, n, k, gated in runs:
        if (n, k) not in weights_of:
            weights_of.clear()  # one shape's copies at a time (lm_head's are 2 GB)
            copies = max(2, -(-4 * L2_BYTES // (n * k * 2)))
            weights_of[(n, k)] = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        weights = weights_of[(n, k)]
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            reference = torch.nn.functional.linear(x.float(), weights[0].float())
            baseline = torch.nn.functional.linear
            if gated:
                reference = cublas_then_silu(x, weights[0]).float()
                baseline = cublas_then_silu
            tolerance = 0.02 * (1 + reference.abs().max().item())
            row = {"shape": name, "rows": m, "cublaslt": round(time_us(baseline, weights, x, rep=100), 2)}
            best = ("cublaslt", row["cublaslt"], None)
            for label, entry, kernel, kwargs in candidates(m, n, gated, args.kernels):

                def run(a, w, kernel=kernel, kwargs=kwargs):
                    return kernel(a, w, **kwargs)

                try:
                    error = (run(x, weights[0]).float() - reference).abs().max().item()
                except triton.runtime.errors.OutOfResources:
                    row[label] = "too large"
                    continue
                if error > tolerance:
                    row[label] = f"wrong (max error {error:.3g})"
                    continue
                row[label] = round(time_us(run, weights, x, rep=100), 2)
                if row[label] < best[1]:
                    best = (label, row[label], entry)
            seconds = best[1] * 1e-6
            row["best"] = best[0]
            row["best_TBps"] = round(n * k * 2 / seconds / 1e12, 2)
            row["best_TFLOPs"] = round(2 * m * n * k / seconds / 1e12, 1)
            row["vs_cublaslt"] = round(row["cublaslt"] / best[1], 3)
            print(json.dumps(row), flush=True)
            table[f"{m}:{n}:{k}" + (":silu" if gated else "")] = best[2]
            if args.write_tuning:  # after every row: a sweep cut short still leaves its table
                with open(args.write_tuning, "w") as f:
                    configs = by_shape_then_rows(table)
                    json.dump({"device": device, "torch": torch.__version__, "configs": configs}, f, indent=1)


if __name__ == "__main__":
    main()
