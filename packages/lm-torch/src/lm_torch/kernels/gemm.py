"""y = x @ W^T for the row counts of decode steps (2 to a few hundred rows), and the table that picks its kernel.

A decode step of 2-256 rows multiplies every weight by few rows: up to ~64 rows the product is bound by reading W,
beyond that by the tensor cores, and in between both matter. cuBLAS's choices there leave time on the table on an
H100: in a ShareGPT throughput profile (benchmarks/RESULTS.md, seventh session) the gate_up product of the
129-256-row decode steps took 172 us a call, about twice what reading its weight or its FLOPs at 700 TFLOP/s
need. Two Triton kernels and a cuBLAS variant (`benchmarks/gemm.py` times them against cuBLASLt):

- `kernels.gemv.skinny_gemm` (up to 64 rows): W the dot's first operand, the rows padded to 16; one program per
  block of output features streams its rows of W once.
- `tiled_gemm` (any rows): output tiles of block_m rows x block_n features, numbered row tile fastest, so the
  programs that need the same tile of W run side by side and all but the first find it in L2: W comes from memory
  about once however many row tiles there are.
- `transposed_cublas_gemm` (any rows): cuBLAS on the transposed problem, y^T = W x^T, copied back to rows; cuBLAS
  picks other tiles for it than for x W^T (on the H100 worse ones: 10-55% slower at 64-256 rows, so the committed
  table never names it).

With `activation`, the tiled GEMM takes a fused [gate | up] weight and writes act(gate) * up: each program
multiplies the matching tiles of both halves (an MLP's gate_up product and its activation in one launch, the
[rows, 2 x intermediate] product never written).

`gemm_launch(rows, N, K[, activation])` looks the shape up in the tuning table `benchmarks/gemm.py
--write-tuning` writes ($LM_TORCH_GEMM_TUNING, else kernels/gemm_tuning.json; "none": cuBLAS everywhere);
`layers.cuda_linear` calls it.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

from lm_torch.kernels.activation import ACTIVATION_CODES, activate
from lm_torch.kernels.common import cuda_device_name, pdl_enabled, pdl_trigger, pdl_wait, read_tuning_file
from lm_torch.kernels.gemv import check_rows_and_weight, skinny_gemm


@triton.jit
def _tiled_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    m,
    n,  # output features (with ACT: the intermediate size; W has 2n rows, [gate | up])
    k,
    stride_xm,
    stride_wn,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN: tl.constexpr,  # N a multiple of BLOCK_N and K of BLOCK_K: no masks on W
    ACT: tl.constexpr,  # -1: plain product; else an `ACTIVATION_CODES` code: write act(gate) * up
    PDL: tl.constexpr,
):
    # Row tiles fastest: the row tiles of one feature tile are consecutive programs, which the GPU runs together.
    pid = tl.program_id(0)
    row_tiles = tl.cdiv(m, BLOCK_M)
    pid_m = pid % row_tiles
    pid_n = pid // row_tiles
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    features = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + features[:, None].to(tl.int64) * stride_wn
    up_rows = w_ptr + (features + n)[:, None].to(tl.int64) * stride_wn  # with ACT: the matching up rows
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    row_mask = rows[:, None] < m
    pdl_wait(PDL)
    pdl_trigger(PDL)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, k, BLOCK_K):
        ks = start + cols
        if EVEN:
            x = tl.load(x_rows + ks[None, :], mask=row_mask, other=0.0)
            w = tl.load(w_rows + ks[None, :])
        else:
            w_mask = (features[:, None] < n) & (ks[None, :] < k)
            x = tl.load(x_rows + ks[None, :], mask=row_mask & (ks[None, :] < k), other=0.0)
            w = tl.load(w_rows + ks[None, :], mask=w_mask, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
        if ACT >= 0:
            if EVEN:  # noqa: SIM108 - a compile-time branch
                w_up = tl.load(up_rows + ks[None, :])
            else:
                w_up = tl.load(up_rows + ks[None, :], mask=w_mask, other=0.0)
            acc_up = tl.dot(x, tl.trans(w_up), acc_up)
    out_type = out_ptr.dtype.element_ty
    if ACT >= 0:
        # Rounded as the unfused path rounds: gate and up to the output dtype first, act(gate) * up in float32.
        gate = acc.to(out_type).to(tl.float32)
        result = (activate(gate, ACT) * acc_up.to(out_type).to(tl.float32)).to(out_type)
    else:
        result = acc.to(out_type)
    dst = out_ptr + rows[:, None].to(tl.int64) * stride_om + features[None, :]
    tl.store(dst, result, mask=row_mask & (features[None, :] < n))


def tiled_gemm(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K], K contiguous; with `activation`, [2 * I, K]: the gate rows, then the up rows
    *,
    block_m: int = 128,
    block_n: int = 128,
    block_k: int = 64,
    num_warps: int = 8,
    num_stages: int = 3,
    activation: str | None = None,
) -> torch.Tensor:  # [M, N] in x's dtype; with `activation`, [M, I]: act(x @ gate^T) * (x @ up^T)
    """x @ weight^T in output tiles whose programs sharing a tile of W run together (float32 accumulation). With
    `activation` (a fused [gate | up] weight) each program multiplies both halves and writes act(gate) * up."""
    check_rows_and_weight("tiled_gemm", x, weight)
    if activation is not None and activation not in ACTIVATION_CODES:
        raise ValueError(f"activation {activation!r} is not supported (supported: {', '.join(ACTIVATION_CODES)})")
    if activation is not None and weight.shape[0] % 2:
        raise ValueError(f"tiled_gemm: a gated weight needs [gate | up] rows, got {weight.shape[0]}")
    m, k = x.shape
    n = weight.shape[0] // 2 if activation is not None else weight.shape[0]
    out = x.new_empty((m, n))
    pdl = pdl_enabled(x.device)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _tiled_kernel[grid](
        x,
        weight,
        out,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        EVEN=n % block_n == 0 and k % block_k == 0,
        ACT=-1 if activation is None else ACTIVATION_CODES[activation],
        PDL=pdl,
        num_warps=num_warps,
        num_stages=num_stages,
        **({"launch_pdl": True} if pdl else {}),
    )
    return out


def transposed_cublas_gemm(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
) -> torch.Tensor:  # [M, N] in x's dtype, contiguous
    """x @ weight^T as (weight @ x^T)^T: cuBLAS (torch.mm) on the transposed problem, then the copy back to rows."""
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1] or x.shape[0] < 1:
        raise ValueError(
            f"transposed_cublas_gemm: x {tuple(x.shape)} and weight {tuple(weight.shape)} are not [M, K] and [N, K]"
        )
    return torch.mm(weight, x.t()).t().contiguous()


GEMM_TUNING_ENV = "LM_TORCH_GEMM_TUNING"
DEFAULT_TUNING = str(Path(__file__).with_name("gemm_tuning.json"))
# Each kernel's launch arguments, as the tuning table names them.
LAUNCH_KEYS = {
    "skinny": ("block_n", "block_k", "num_warps", "num_stages", "split_k"),
    "tiled": ("block_m", "block_n", "block_k", "num_warps", "num_stages"),
    "cublas_t": (),  # transposed_cublas_gemm: no launch arguments
}


def _current_device_name() -> str | None:
    """The current CUDA device's name (None without CUDA: the interpreter's tests)."""
    return cuda_device_name(torch.device("cuda")) if torch.cuda.is_available() else None


@functools.cache
def _tuning_table(
    path: str, device_name: str | None = None, named: bool = False
) -> dict[tuple, list[tuple[int, dict | None]]]:
    """(N, K, activation or None) -> [(rows, launch or None for cuBLAS)] sorted by rows, from the file at `path`;
    empty when the file names the card it was measured on and `device_name` is another (its winners were that
    card's: another one runs cuBLAS until a sweep of its own). A file `named` by $LM_TORCH_GEMM_TUNING must exist."""
    data = read_tuning_file(path, GEMM_TUNING_ENV, named)
    if data is None or (device_name is not None and data.get("device") not in (None, device_name)):
        return {}
    configs = data["configs"]
    table: dict[tuple, list[tuple[int, dict | None]]] = {}
    for key, launch in configs.items():
        parts = key.split(":")
        try:
            rows, n, k = (int(part) for part in parts[:3])
        except ValueError:
            rows = None
        activation = parts[3] if len(parts) == 4 else None
        if rows is None or len(parts) not in (3, 4) or (activation is not None and activation not in ACTIVATION_CODES):
            raise ValueError(f"{path}: GEMM tuning keys are 'rows:N:K' or 'rows:N:K:activation', got {key!r}")
        if launch is not None:
            names = LAUNCH_KEYS.get(launch.get("kernel"))
            if names is None or sorted(launch) != sorted(("kernel", *names)):
                arguments = "; ".join(f"{kind}: {', '.join(v) or 'none'}" for kind, v in LAUNCH_KEYS.items())
                raise ValueError(
                    f"{path}: the launch of {key!r} must be null or name a kernel ({', '.join(LAUNCH_KEYS)}) and "
                    f"exactly its arguments ({arguments})"
                )
            if activation is not None and launch["kernel"] != "tiled":
                raise ValueError(f"{path}: {key!r}: only the tiled kernel applies an activation")
        table.setdefault((n, k, activation), []).append((rows, launch))
    return {shape: sorted(entries, key=lambda e: e[0]) for shape, entries in table.items()}


def gemm_launch(rows: int, n: int, k: int, activation: str | None = None):
    """(kernel function, its keyword arguments) for `rows` rows of an N x K weight (with `activation`: a fused
    [gate | up] weight of N rows whose product is followed by act(gate) * up): the table's entry of the fewest rows
    measured at or above `rows`; None (cuBLAS, then the activation kernel) where there is no such entry or cuBLAS
    measured fastest."""
    named = os.environ.get(GEMM_TUNING_ENV)
    table = _tuning_table(named or DEFAULT_TUNING, _current_device_name(), named=bool(named))
    for measured, launch in table.get((n, k, activation), []):
        if measured >= rows:
            if launch is None:
                return None
            args = {name: value for name, value in launch.items() if name != "kernel"}
            if launch["kernel"] == "skinny":
                return skinny_gemm, args
            if launch["kernel"] == "cublas_t":
                return transposed_cublas_gemm, args
            if activation is not None:
                args["activation"] = activation
            return tiled_gemm, args
    return None
