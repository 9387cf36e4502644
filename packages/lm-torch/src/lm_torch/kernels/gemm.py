"""y = x @ W^T for the row counts of decode steps (2 to a few hundred rows), and the table that picks its kernel.

A decode step of 2-256 rows multiplies every weight by few rows: up to ~64 rows the product is bound by reading W,
beyond that by the tensor cores, and in between both matter, where cuBLAS's choices can leave time on the table.
Three Triton kernels and a cuBLAS variant (`benchmarks/gemm.py` times them against cuBLASLt):

- `kernels.gemv.skinny_gemm` (up to 64 rows): W the dot's first operand, the rows padded to 16; one program per
  block of output features streams its rows of W once.
- `tiled_gemm` (any rows): output tiles of block_m rows x block_n features, numbered row tile fastest, so the
  programs that need the same tile of W run side by side and all but the first find it in L2: W comes from memory
  about once however many row tiles there are.
- `tma_gemm` (any rows): the tiled GEMM's tiles with the blocks of x and W loaded by the TMA copy engine, and an
  optional split of K (the last split of a tile to finish adds the others' float32 partial sums), so that the few
  output tiles of a 64-256-row product can fill the SMs.
- `transposed_cublas_gemm` (any rows): cuBLAS on the transposed problem, y^T = W x^T, copied back to rows; cuBLAS
  picks other tiles for it than for x W^T.

Which one runs for a shape is the tuning table's choice (measured per card), never fixed here.

With `activation`, the tiled GEMM takes a fused [gate | up] weight and writes act(gate) * up: each program
multiplies the matching tiles of both halves (an MLP's gate_up product and its activation in one launch, the
[rows, 2 x intermediate] product never written).

`gemm_launch(rows, N, K[, activation])` looks the shape up in the tuning table `benchmarks/gemm.py
--write-tuning` writes (`KernelConfig.gemm_tuning`, else kernels/gemm_tuning.json; "none": cuBLAS everywhere);
`layers.cuda_linear` calls it.
"""

# Triton's type stubs describe host Python, not the @triton.jit language, so these rules are off here:
# reportGeneralTypeIssues: `tl.range` / `tl.static_range` are typed as not iterable.
# pyright: reportGeneralTypeIssues=false

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from lm_torch.kernels.activation import ACTIVATION_CODES, activate
from lm_torch.kernels.common import (
    arrives_last,
    cuda_device_name,
    pdl_enabled,
    pdl_trigger,
    pdl_wait,
    persistent_zeros,
    read_tuning_file,
)
from lm_torch.kernels.gemv import check_rows_and_weight, skinny_gemm

if TYPE_CHECKING:
    from lm_torch.kernels.tuning import TuningTables


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
    _store_tile(out_ptr, acc, acc_up, rows, features, m, n, stride_om, ACT)


def _check_operands(name: str, x: torch.Tensor, weight: torch.Tensor, activation: str | None) -> int:
    """`check_rows_and_weight`, and with `activation` a supported one and a [gate | up] weight of even rows; returns
    the product's output features (with `activation`, half the weight's rows)."""
    check_rows_and_weight(name, x, weight)
    if activation is not None and activation not in ACTIVATION_CODES:
        raise ValueError(f"activation {activation!r} is not supported (supported: {', '.join(ACTIVATION_CODES)})")
    if activation is not None and weight.shape[0] % 2:
        raise ValueError(f"{name}: a gated weight needs [gate | up] rows, got {weight.shape[0]}")
    return weight.shape[0] // 2 if activation is not None else weight.shape[0]


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
    allow_pdl: bool = True,  # False: never programmatic dependent launch (`KernelConfig.pdl`)
) -> torch.Tensor:  # [M, N] in x's dtype; with `activation`, [M, I]: act(x @ gate^T) * (x @ up^T)
    """x @ weight^T in output tiles whose programs sharing a tile of W run together (float32 accumulation). With
    `activation` (a fused [gate | up] weight) each program multiplies both halves and writes act(gate) * up."""
    n = _check_operands("tiled_gemm", x, weight, activation)
    m, k = x.shape
    out = x.new_empty((m, n))
    pdl = pdl_enabled(x.device, allow_pdl)
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
        num_warps=num_warps,  # pyright: ignore[reportCallIssue]  # triton launch option
        num_stages=num_stages,  # pyright: ignore[reportCallIssue]  # triton launch option
        **({"launch_pdl": True} if pdl else {}),
    )
    return out


@triton.jit
def _tma_kernel(
    x_desc,  # TMA descriptor of x [M, K], blocks [BLOCK_M, BLOCK_K]
    w_desc,  # TMA descriptor of W [N or 2n, K], blocks [BLOCK_N, BLOCK_K]
    out_ptr,
    partial_ptr,  # split-K: float32 [(2 if ACT) x tiles x splits x BLOCK_M x BLOCK_N]
    counters_ptr,  # split-K: int32 [>= tiles], zero on entry and on exit (`persistent_zeros`)
    m,
    n,  # output features (with ACT: the intermediate size; W has 2n rows, [gate | up])
    k,
    stride_om,
    k_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,  # more than one split of K: partial sums, the last split to arrive finishes the tile
    ACT: tl.constexpr,
    PDL: tl.constexpr,
):
    # Tiles numbered row tile fastest, as `_tiled_kernel`; the copy engine (TMA) brings each block of x and W into
    # shared memory, zero-filled past M, N and K, so the loop has no masks.
    tile = tl.program_id(0)
    pid_k = tl.program_id(1)
    row_tiles = tl.cdiv(m, BLOCK_M)
    off_m = (tile % row_tiles) * BLOCK_M
    off_n = (tile // row_tiles) * BLOCK_N
    first = pid_k * k_per_split
    stop = tl.minimum(first + k_per_split, k)
    pdl_wait(PDL)
    pdl_trigger(PDL)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in tl.range(first, stop, BLOCK_K):
        x = x_desc.load([off_m, start])
        acc = tl.dot(x, w_desc.load([off_n, start]).T, acc)
        if ACT >= 0:
            acc_up = tl.dot(x, w_desc.load([off_n + n, start]).T, acc_up)
    rows = off_m + tl.arange(0, BLOCK_M)
    features = off_n + tl.arange(0, BLOCK_N)
    if SPLIT:
        # Each split stores its sums; the last of the tile's splits to arrive adds them in split order
        # (deterministic) and writes the output: one launch, no zeroing, no float atomics.
        splits = tl.num_programs(1)
        tile_elems: tl.constexpr = BLOCK_M * BLOCK_N
        inside = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        base = partial_ptr + tile.to(tl.int64) * splits * tile_elems
        up_base = base + tl.num_programs(0).to(tl.int64) * splits * tile_elems
        tl.store(base + pid_k * tile_elems + inside, acc)
        if ACT >= 0:
            tl.store(up_base + pid_k * tile_elems + inside, acc_up)
        counter = counters_ptr + tile
        if arrives_last(counter, splits):
            acc = _sum_splits(base, inside, splits, tile_elems)
            if ACT >= 0:
                acc_up = _sum_splits(up_base, inside, splits, tile_elems)
            _store_tile(out_ptr, acc, acc_up, rows, features, m, n, stride_om, ACT)
            tl.store(counter, 0)  # the next launch (next layer, next graph replay) counts from zero again
    else:
        _store_tile(out_ptr, acc, acc_up, rows, features, m, n, stride_om, ACT)


@triton.jit
def _sum_splits(base, inside, splits, tile_elems: tl.constexpr):
    """The sum, in split order, of a tile's `splits` float32 partial tiles stored `tile_elems` apart from `base`
    (read past L1: other programs wrote them)."""
    total = tl.load(base + inside, cache_modifier=".cg")
    for s in range(1, splits):
        total += tl.load(base + s * tile_elems + inside, cache_modifier=".cg")
    return total


@triton.jit
def _store_tile(out_ptr, acc, acc_up, rows, features, m, n, stride_om, ACT: tl.constexpr):
    """A finished [rows, features] tile of float32 sums to the output (with ACT: act(gate) * up)."""
    out_type = out_ptr.dtype.element_ty
    if ACT >= 0:
        # Rounded as the unfused path rounds: gate and up to the output dtype first, act(gate) * up in float32.
        gate = acc.to(out_type).to(tl.float32)
        result = (activate(gate, ACT) * acc_up.to(out_type).to(tl.float32)).to(out_type)
    else:
        result = acc.to(out_type)
    dst = out_ptr + rows[:, None].to(tl.int64) * stride_om + features[None, :]
    tl.store(dst, result, mask=(rows[:, None] < m) & (features[None, :] < n))


SPLIT_PARTIALS = "gemm split-K partial sums"  # the `persistent_zeros` buffers' names
SPLIT_COUNTERS = "gemm split-K counters"


def tma_gemm(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K], K contiguous; with `activation`, [2 * I, K]: the gate rows, then the up rows
    *,
    block_m: int = 128,
    block_n: int = 128,
    block_k: int = 64,
    num_warps: int = 8,
    num_stages: int = 4,
    split_k: int = 1,
    activation: str | None = None,
    allow_pdl: bool = True,  # False: never programmatic dependent launch (`KernelConfig.pdl`)
) -> torch.Tensor:  # [M, N] in x's dtype; with `activation`, [M, I]
    """x @ weight^T in output tiles whose blocks of x and W the TMA copy engine loads, optionally split along K
    (`split_k` programs per tile, the last to finish adding the others' partial sums): for the 64-256-row decode
    steps, whose few output tiles leave most of an H100's SMs idle without a split. With `activation` (a fused
    [gate | up] weight) each program multiplies both halves and writes act(gate) * up."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    n = _check_operands("tma_gemm", x, weight, activation)
    m, k = x.shape
    align = 16 // x.element_size()  # TMA: 16-byte aligned base and row stride
    if weight.stride(0) % align or weight.data_ptr() % 16 or weight.dtype != x.dtype:
        raise ValueError(f"tma_gemm: the weight must be {x.dtype} with 16-byte aligned rows (K = {k})")
    if x.stride(0) % align or x.data_ptr() % 16:  # a view: copied to an aligned buffer, where K allows one
        if k % align:
            raise ValueError(f"tma_gemm: K = {k} rows of x cannot be 16-byte aligned")
        x = x.clone(memory_format=torch.contiguous_format)
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    splits = triton.cdiv(k, k_per_split)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    out = x.new_empty((m, n))
    halves = 2 if activation is not None else 1
    partials = persistent_zeros(
        x.device, SPLIT_PARTIALS, halves * tiles * splits * block_m * block_n if splits > 1 else 1, torch.float32
    )
    counters = persistent_zeros(x.device, SPLIT_COUNTERS, tiles if splits > 1 else 1)
    pdl = pdl_enabled(x.device, allow_pdl)
    _tma_kernel[(tiles, splits)](
        TensorDescriptor.from_tensor(x, [block_m, block_k]),
        TensorDescriptor.from_tensor(weight, [block_n, block_k]),
        out,
        partials,
        counters,
        m,
        n,
        k,
        out.stride(0),
        k_per_split,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SPLIT=splits > 1,
        ACT=-1 if activation is None else ACTIVATION_CODES[activation],
        PDL=pdl,
        num_warps=num_warps,  # pyright: ignore[reportCallIssue]  # triton launch option
        num_stages=num_stages,  # pyright: ignore[reportCallIssue]  # triton launch option
        **({"launch_pdl": True} if pdl else {}),
    )
    return out


def transposed_cublas_gemm(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    *,
    allow_pdl: bool = True,  # taken for a uniform launch signature; cuBLAS launches without PDL
) -> torch.Tensor:  # [M, N] in x's dtype, contiguous
    """x @ weight^T as (weight @ x^T)^T: cuBLAS (torch.mm) on the transposed problem, then the copy back to rows."""
    del allow_pdl
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1] or x.shape[0] < 1:
        raise ValueError(
            f"transposed_cublas_gemm: x {tuple(x.shape)} and weight {tuple(weight.shape)} are not [M, K] and [N, K]"
        )
    return torch.mm(weight, x.t()).t().contiguous()


GEMM_TUNING_SETTING = "KernelConfig.gemm_tuning"
DEFAULT_TUNING = str(Path(__file__).with_name("gemm_tuning.json"))
# Each kernel's launch arguments, as the tuning table names them.
LAUNCH_KEYS = {
    "skinny": ("block_n", "block_k", "num_warps", "num_stages", "split_k"),
    "tiled": ("block_m", "block_n", "block_k", "num_warps", "num_stages"),
    "tma": ("block_m", "block_n", "block_k", "num_warps", "num_stages", "split_k"),
    "cublas_t": (),  # transposed_cublas_gemm: no launch arguments
}


def _current_device_name() -> str | None:
    """The current CUDA device's name (None without CUDA: the interpreter's tests)."""
    return cuda_device_name(torch.device("cuda")) if torch.cuda.is_available() else None


@functools.cache
def load_gemm_table(
    path: str, device_name: str | None = None, named: bool = False
) -> dict[tuple, list[tuple[int, dict | None]]]:
    """(N, K, activation or None) -> [(rows, launch or None for cuBLAS)] sorted by rows, from the file at `path`;
    empty when the file names the card it was measured on and `device_name` is another (its winners were that
    card's: another one runs cuBLAS until a sweep of its own). A file `named` by `KernelConfig.gemm_tuning` must
    exist."""
    data = read_tuning_file(path, GEMM_TUNING_SETTING, named)
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
            if activation is not None and launch["kernel"] not in ("tiled", "tma"):
                raise ValueError(f"{path}: {key!r}: only the tiled and TMA kernels apply an activation")
        table.setdefault((n, k, activation), []).append((rows, launch))
    return {shape: sorted(entries, key=lambda e: e[0]) for shape, entries in table.items()}


def gemm_launch(rows: int, n: int, k: int, activation: str | None = None, tuning: TuningTables | None = None):
    """(kernel function, its keyword arguments) for `rows` rows of an N x K weight (with `activation`: a fused
    [gate | up] weight of N rows whose product is followed by act(gate) * up): the table's entry of the fewest rows
    measured at or above `rows`; None (cuBLAS, then the activation kernel) where there is no such entry or cuBLAS
    measured fastest. `tuning`: the engine's tables (None: the tables shipped beside the kernels)."""
    from lm_torch.kernels.tuning import shipped_tables

    tables = tuning if tuning is not None else shipped_tables(_current_device_name())
    return launch_from_table(tables.gemm_table, rows, n, k, activation)


def launch_from_table(table: dict[tuple, list[tuple[int, dict | None]]], rows: int, n: int, k: int, activation=None):
    """`gemm_launch`'s lookup in a loaded table (`load_gemm_table`)."""
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
            return (tma_gemm if launch["kernel"] == "tma" else tiled_gemm), args
    return None
