"""W4A16 linears y = x @ W^T with 4-bit weights in groups along the inputs: the AWQ and GPTQ layers on CUDA.

The weights are in `lm_torch.kernels.w4a16_layout`'s packing (`pack_int4`; `layers.quant.weight_only` repacks AWQ and
GPTQ checkpoints into it once).

Three kernels (the tuning table picks one per shape, `w4a16_linear`):
- `_w4a16_gemv_kernel`, one input row (batch-1 decode), meant to be bound by reading the packed weight (a quarter
  of the bf16 bytes) with cheap dequantization: a nibble becomes the float 1 + q / 16 by a shift and one AND-OR
  into the mantissa of 1.0 (`_plane`; an integer-to-float conversion runs at a quarter of the rate), one FMA with
  x, and the zero and scale are applied once per word and block. A loop step reads BLOCKS blocks side by side (a
  [BLOCK_N, BLOCKS, B / 8] tile of words), each thread holds several rows (reusing every x value it loads), and the
  next step's operands are requested before this step's arithmetic. With ~5 instructions per weight in the loop
  (SASS), issue limits it about as much as memory does.
- `w4a16_tc.w4a16_gemv_tc`, one input row on the tensor cores (its own module, with the last steps that apply
  the MLP's activation or the rotary and KV-cache write): ~1.5-2.5 SASS instructions per weight.
- `_w4a16_gemm_kernel`, more rows: a block's [BLOCK_N, 8, B / 8] planes are dequantized in registers into the
  activation dtype, viewed [BLOCK_N, B] (plane t, word j is input t * B / 8 + j: x's own order) and multiplied by
  BLOCK_M rows on the tensor cores; small M runs BLOCK_M = 16 with split-K so that enough programs stream the
  weight, large M (prefill) big tiles.
Split-K programs of `gemv` and `gemm` add float32 partial sums atomically (a zeroing and a cast launch around the
kernel); `gemv_tc`'s store theirs and the last split of a row block adds them up and writes the output (one launch,
deterministic order). Without split the result is stored directly (one launch).
"""

# Triton's type stubs describe host Python, not the @triton.jit language, so these rules are off here:
# reportArgumentType: `tl.constexpr` parameters are typed as the class `constexpr`, so the plain values passed to them
#   are rejected.
# reportGeneralTypeIssues: `tl.range` / `tl.static_range` are typed as not iterable.
# pyright: reportArgumentType=false, reportGeneralTypeIssues=false

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from lm_torch.kernels.common import multiprocessor_count, next_power_of_2, read_tuning_file
from lm_torch.kernels.w4a16_layout import MAX_BLOCK, block_inputs, check_call, pack_int4, split_blocks
from lm_torch.kernels.w4a16_tc import QKVRotary, w4a16_gemv_tc

if TYPE_CHECKING:
    from lm_torch.kernels.tuning import TuningTables

__all__ = [
    "MAX_BLOCK",
    "QKVRotary",
    "block_inputs",
    "pack_int4",
    "rows_bucket",
    "tuned_configs",
    "w4a16_dequantize",
    "w4a16_gemm",
    "w4a16_gemv",
    "w4a16_gemv_tc",
    "w4a16_linear",
]


@triton.jit
def _plane(words, t: tl.constexpr):
    """Plane t of a [.., W] int32 tile as the floats 1 + q / 16, in [1, 2): the nibble moved to the top mantissa
    bits of 1.0 (a shift and one AND-OR), so no integer-to-float conversion. Callers undo the offset and the 1/16
    per group: sum (q - z) x = 16 sum (1 + q / 16) x - (16 + z) sum x (terms of similar size: no cancellation)."""
    if 4 * t <= 19:  # noqa: SIM108 - a compile-time branch; triton keeps only one side
        moved = words << (19 - 4 * t)
    else:
        moved = words >> (4 * t - 19)
    return ((moved & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _gemv_step(w_ptrs, s_ptr, z_ptr, rows, row_mask, bi, n, b0, WORDS, BLOCK, GROUP, EVEN_N: tl.constexpr):
    """The words [BN, BLOCKS, W] and float32 scales and zeros [BN, BLOCKS] of the step starting at block b0."""
    groups = (b0 + bi) * BLOCK // GROUP  # [BLOCKS]
    sz_offsets = groups[None, :] * n + rows[:, None]  # [BN, BLOCKS]
    if EVEN_N:
        words = tl.load(w_ptrs + b0 * WORDS)
        s = tl.load(s_ptr + sz_offsets)
        z = tl.load(z_ptr + sz_offsets)
    else:
        words = tl.load(w_ptrs + b0 * WORDS, mask=row_mask[:, None, None], other=0)
        s = tl.load(s_ptr + sz_offsets, mask=row_mask[:, None], other=0.0)
        z = tl.load(z_ptr + sz_offsets, mask=row_mask[:, None], other=0.0)
    return words, s.to(tl.float32), z.to(tl.float32)


@triton.jit
def _x_planes(ptrs, WORDS: tl.constexpr):
    """The 8 slices of x [BLOCKS, W] that planes 0..7 of a step meet (x[b * B + t * W + j] for plane t)."""
    return (
        tl.load(ptrs),
        tl.load(ptrs + WORDS),
        tl.load(ptrs + 2 * WORDS),
        tl.load(ptrs + 3 * WORDS),
        tl.load(ptrs + 4 * WORDS),
        tl.load(ptrs + 5 * WORDS),
        tl.load(ptrs + 6 * WORDS),
        tl.load(ptrs + 7 * WORDS),
    )


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    n,
    words_per_row,
    blocks_per_split,
    GROUP: tl.constexpr,
    BLOCK: tl.constexpr,  # inputs of an interleaved block
    BLOCK_N: tl.constexpr,
    BLOCKS: tl.constexpr,  # blocks per loop step, side by side in the tile (blocks_per_split is a multiple)
    EVEN_N: tl.constexpr,
    PREFETCH: tl.constexpr,  # load step i + 1's words, scales and zeros while computing step i
    PREFETCH_X: tl.constexpr,  # and its slices of x
    ATOMIC: tl.constexpr,
):
    WORDS: tl.constexpr = BLOCK // 8  # words of a block per row
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_mask = rows < n
    bi = tl.arange(0, BLOCKS)
    wi = tl.arange(0, WORDS)
    # A step reads BLOCKS consecutive blocks: BLOCKS * W contiguous words of each row.
    w_ptrs = w_ptr + rows[:, None, None].to(tl.int64) * words_per_row + (bi[:, None] * WORDS + wi[None, :])[None]
    # [BLOCKS, W]: plane t of block b meets x[b * B + t * W + j]. Written with runs of 4 so that triton loads x in
    # 4-wide vectors, the layout the word tile already has along its last two dimensions (no shuffle through
    # shared memory per plane).
    x_offsets = bi[:, None] * BLOCK + ((wi // 4) * 4)[None, :] + (wi % 4)[None, :]
    first = pid_k * blocks_per_split
    last = tl.minimum(first + blocks_per_split, words_per_row // WORDS)  # the last split may be shorter
    acc = tl.zeros([BLOCK_N, BLOCKS, WORDS], tl.float32)
    if PREFETCH:
        words, s, z = _gemv_step(w_ptrs, s_ptr, z_ptr, rows, row_mask, bi, n, first, WORDS, BLOCK, GROUP, EVEN_N)
    if PREFETCH_X:
        xs = _x_planes(x_ptr + first * BLOCK + x_offsets, WORDS)
    for b0 in range(first, last, BLOCKS):
        # The next step's operands are requested before this step's arithmetic, so that their latency hides behind
        # it (the last step fetches its own blocks again: in bounds, and unused).
        following = tl.minimum(b0 + BLOCKS, last - BLOCKS)
        if PREFETCH:
            cur_words, cur_s, cur_z = words, s, z
            words, s, z = _gemv_step(
                w_ptrs, s_ptr, z_ptr, rows, row_mask, bi, n, following, WORDS, BLOCK, GROUP, EVEN_N
            )
        else:
            cur_words, cur_s, cur_z = _gemv_step(
                w_ptrs, s_ptr, z_ptr, rows, row_mask, bi, n, b0, WORDS, BLOCK, GROUP, EVEN_N
            )
        if PREFETCH_X:
            cur_xs = xs
            xs = _x_planes(x_ptr + following * BLOCK + x_offsets, WORDS)
        else:
            cur_xs = _x_planes(x_ptr + b0 * BLOCK + x_offsets, WORDS)
        a = tl.zeros([BLOCK_N, BLOCKS, WORDS], tl.float32)  # sum over planes of (1 + q / 16) x
        x_sum = tl.zeros([BLOCKS, WORDS], tl.float32)
        for t in tl.static_range(8):
            x_t = cur_xs[t].to(tl.float32)  # [BLOCKS, W]
            a += _plane(cur_words, t) * x_t[None, :, :]
            x_sum += x_t
        acc += a * (16.0 * cur_s)[:, :, None] - x_sum[None, :, :] * ((16.0 + cur_z) * cur_s)[:, :, None]
    total = tl.sum(tl.sum(acc, 2), 1)  # [BN]
    if ATOMIC:
        tl.atomic_add(out_ptr + rows, total, mask=row_mask)
    else:
        tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _gemm_block(w_ptrs, s_ptr, z_ptr, rows_n, n_mask, n, block, WORDS, BLOCK, GROUP):
    """Words [BN, W] and float32 scales and zeros [BN] of one block."""
    group = block * BLOCK // GROUP
    words = tl.load(w_ptrs + block * WORDS, mask=n_mask[:, None], other=0)
    s = tl.load(s_ptr + group * n + rows_n, mask=n_mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + group * n + rows_n, mask=n_mask, other=0.0).to(tl.float32)
    return words, s, z


@triton.jit
def _w4a16_gemm_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    m,
    n,
    words_per_row,
    stride_xm,
    stride_om,
    blocks_per_split,
    GROUP: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PREFETCH: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    WORDS: tl.constexpr = BLOCK // 8
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    m_mask = rows_m < m
    n_mask = rows_n < n
    wi = tl.arange(0, WORDS)
    # Bits 4t .. 4t + 3 of word j move to the top of the mantissa: [1, 8, 1] shifts, left for t < 5, right after.
    ti = tl.arange(0, 8)[None, :, None]
    left = tl.maximum(19 - 4 * ti, 0)
    right = tl.maximum(4 * ti - 19, 0)
    w_ptrs = w_ptr + rows_n[:, None].to(tl.int64) * words_per_row + wi[None, :]  # [BN, W]
    x_ptrs = x_ptr + rows_m[:, None].to(tl.int64) * stride_xm + tl.arange(0, BLOCK)[None, :]  # [BM, B]
    first = pid_k * blocks_per_split
    last = tl.minimum(first + blocks_per_split, words_per_row // WORDS)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if PREFETCH:
        words, s, z = _gemm_block(w_ptrs, s_ptr, z_ptr, rows_n, n_mask, n, first, WORDS, BLOCK, GROUP)
    for block in range(first, last):
        if PREFETCH:  # the next block's weights are requested before this block's arithmetic
            cur_words, cur_s, cur_z = words, s, z
            following = tl.minimum(block + 1, last - 1)
            words, s, z = _gemm_block(w_ptrs, s_ptr, z_ptr, rows_n, n_mask, n, following, WORDS, BLOCK, GROUP)
        else:
            cur_words, cur_s, cur_z = _gemm_block(w_ptrs, s_ptr, z_ptr, rows_n, n_mask, n, block, WORDS, BLOCK, GROUP)
        moved = (cur_words[:, None, :] << left) >> right  # [BN, 8, W]: nibble t of each word at bits 19 .. 22
        v = ((moved & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)  # 1 + q / 16
        w = v * (16.0 * cur_s)[:, None, None] - ((16.0 + cur_z) * cur_s)[:, None, None]  # (q - z) * s
        # [BN, 8, W] -> [BN, B]: plane t, word j is input t * W + j of the block, x's own order.
        w = tl.reshape(w.to(x_ptr.dtype.element_ty), (BLOCK_N, BLOCK))
        x = tl.load(x_ptrs + block * BLOCK, mask=m_mask[:, None], other=0.0)  # [BM, B]
        acc = tl.dot(x, tl.trans(w), acc)
    out_ptrs = out_ptr + rows_m[:, None].to(tl.int64) * stride_om + rows_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _w4a16_dequant_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, n, k, GROUP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr
):
    WORDS: tl.constexpr = BLOCK // 8
    block = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_mask = rows < n
    wi = tl.arange(0, WORDS)
    words = tl.load(w_ptr + rows[:, None].to(tl.int64) * (k // 8) + block * WORDS + wi[None, :], mask=row_mask[:, None])
    group = block * BLOCK // GROUP
    s = tl.load(s_ptr + group * n + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    z = tl.load(z_ptr + group * n + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * k + block * BLOCK + wi[None, :]
    for t in tl.static_range(8):
        q = _plane(words, t) * 16.0 - 16.0  # exact: 16 (1 + q / 16) - 16
        tl.store(out_ptrs + t * WORDS, ((q - z) * s).to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


def w4a16_gemv(
    x: torch.Tensor,  # [1, K] bf16 / fp16 (float32 under the interpreter)
    packed: torch.Tensor,  # [N, K / 8] int32 in the `pack_int4` layout
    scales: torch.Tensor,  # [K / group_size, N]
    zeros: torch.Tensor,  # [K / group_size, N]
    group_size: int,
    *,
    block_n: int = 16,
    blocks: int = 4,
    num_warps: int = 4,
    num_stages: int = 1,
    split_k: int = 1,
    prefetch: bool = True,
    prefetch_x: bool = False,
) -> torch.Tensor:  # [1, N] in x's dtype
    """x @ W^T for one row x and a 4-bit grouped weight (float32 accumulation)."""
    m, n, k, block = check_call(x, packed, scales, zeros, group_size)
    if m != 1:
        raise ValueError(f"w4a16_gemv: x has {m} rows, expected 1 (w4a16_gemm takes more)")
    per_split, splits = split_blocks(k // block, blocks, split_k)
    out = torch.zeros((1, n), dtype=torch.float32, device=x.device) if splits > 1 else x.new_empty((1, n))
    _w4a16_gemv_kernel[(triton.cdiv(n, block_n), splits)](
        x,
        packed,
        scales,
        zeros,
        out,
        n,
        k // 8,
        per_split,
        GROUP=group_size,
        BLOCK=block,
        BLOCK_N=block_n,
        BLOCKS=blocks,
        EVEN_N=n % block_n == 0,
        PREFETCH=prefetch,
        PREFETCH_X=prefetch_x,
        ATOMIC=splits > 1,
        num_warps=num_warps,  # pyright: ignore[reportCallIssue]  # triton launch option
        num_stages=num_stages,  # pyright: ignore[reportCallIssue]  # triton launch option
    )
    return out.to(x.dtype) if splits > 1 else out


def w4a16_gemm(
    x: torch.Tensor,  # [M, K]
    packed: torch.Tensor,  # [N, K / 8] int32 in the `pack_int4` layout
    scales: torch.Tensor,  # [K / group_size, N]
    zeros: torch.Tensor,  # [K / group_size, N]
    group_size: int,
    *,
    block_m: int = 16,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 3,
    split_k: int = 1,
    prefetch: bool = False,
) -> torch.Tensor:  # [M, N] in x's dtype
    """x @ W^T with each weight plane dequantized in registers and multiplied on the tensor cores."""
    m, n, k, block = check_call(x, packed, scales, zeros, group_size)
    per_split, splits = split_blocks(k // block, 1, split_k)
    out = torch.zeros((m, n), dtype=torch.float32, device=x.device) if splits > 1 else x.new_empty((m, n))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), splits)
    _w4a16_gemm_kernel[grid](
        x,
        packed,
        scales,
        zeros,
        out,
        m,
        n,
        k // 8,
        x.stride(0),
        out.stride(0),
        per_split,
        GROUP=group_size,
        BLOCK=block,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        PREFETCH=prefetch,
        ATOMIC=splits > 1,
        num_warps=num_warps,  # pyright: ignore[reportCallIssue]  # triton launch option
        num_stages=num_stages,  # pyright: ignore[reportCallIssue]  # triton launch option
    )
    return out.to(x.dtype) if splits > 1 else out


def w4a16_dequantize(
    packed: torch.Tensor,  # [N, K / 8] int32 in the `pack_int4` layout
    scales: torch.Tensor,  # [K / group_size, N]
    zeros: torch.Tensor,  # [K / group_size, N]
    group_size: int,
    *,
    block_n: int = 64,
) -> torch.Tensor:  # [N, K] in the scales' dtype
    """The dense weight W [N, K], (q - zero) * scale rounded once to the scales' dtype: for large M (long prefills),
    where writing W once and multiplying with cuBLAS beats dequantizing every tile for every block of rows."""
    n = packed.shape[0]
    k = packed.shape[1] * 8
    check_call(packed.new_empty((0, k), dtype=scales.dtype), packed, scales, zeros, group_size)
    block = block_inputs(group_size)
    out = torch.empty((n, k), dtype=scales.dtype, device=packed.device)
    _w4a16_dequant_kernel[(triton.cdiv(n, block_n), k // block)](
        packed, scales, zeros, out, n, k, GROUP=group_size, BLOCK=block, BLOCK_N=block_n
    )
    return out


TUNING_SETTING = "KernelConfig.w4a16_tuning"
DEFAULT_TUNING = str(Path(__file__).with_name("w4a16_tuning.json"))


@functools.cache
def load_w4a16_table(path: str, named: bool = False) -> dict[str, dict]:
    """Launch shapes by "rows bucket:N:K:group_size" (buckets 1, 16, 64, 2048 for M = 1, <= 16, <= 64, more), from
    the JSON `benchmarks/w4a16.py --write-tuning` writes: the file `KernelConfig.w4a16_tuning` names (`named`), else
    the one shipped next to this module. Shapes absent from it get `w4a16_linear`'s defaults; "none" uses no table,
    and a named file that does not exist is an error."""
    data = read_tuning_file(path, TUNING_SETTING, named)
    return {} if data is None else data["configs"]


def tuned_configs(tuning: TuningTables | None = None) -> dict[str, dict]:
    """The launch-shape table of `tuning` (None: the table shipped beside this module)."""
    return tuning.w4a16_table if tuning is not None else load_w4a16_table(DEFAULT_TUNING)


def rows_bucket(m: int) -> int:
    """The tuning table's bucket of a row count."""
    return 1 if m == 1 else 16 if m <= 16 else 64 if m <= 64 else 2048


def w4a16_linear(
    x,
    packed,
    scales,
    zeros,
    group_size: int,
    activation: str | None = None,
    rotary: QKVRotary | None = None,
    tuning: TuningTables | None = None,
) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N]: the launch shape of `tuned_configs` for (M's bucket, N, K, group_size), else the
    GEMV for one row, the split-K tensor-core kernel for a few rows, large tiles for prefill.

    `activation`: W is a fused [gate | up] projection; returns act(gate) * up [M, N / 2], inside the GEMV where it
    runs on the tensor cores (one row), else by the activation kernel after the product.

    `rotary` (one row): W is a [q | k | v] projection; returns the row with q and k rotated, k and v written into
    the cache: in the GEMV's last step where it runs on the tensor cores, else by `apply_rotary` after the product."""
    m, k = x.shape
    n = packed.shape[0]
    config = tuned_configs(tuning).get(f"{rows_bucket(m)}:{n}:{k}:{group_size}")
    if m == 1 and config is None and block_inputs(group_size) >= 64:
        config = _gemv_tc_default(x.device, n // 2 if activation else n, k // block_inputs(group_size))
    if rotary is not None:
        if m != 1:
            raise ValueError(f"w4a16_linear: the rotary epilogue takes one row, got {m}")
        if config is not None and config["kernel"] == "gemv_tc" and rotary.head_dim % config["block_n"] == 0:
            params = {key: value for key, value in config.items() if key != "kernel"}
            return w4a16_gemv_tc(x, packed, scales, zeros, group_size, rotary=rotary, **params)
        from lm_torch.kernels.rotary import apply_rotary

        out = w4a16_linear(x, packed, scales, zeros, group_size, tuning=tuning)
        heads, kv_heads, dim = rotary.num_heads, rotary.num_kv_heads, rotary.head_dim
        q, k, v = out.view(1, heads + 2 * kv_heads, dim).split([heads, kv_heads, kv_heads], dim=1)
        apply_rotary(
            rotary.positions,
            q,
            k,
            rotary.cos,
            rotary.sin,
            v=v,
            k_cache=rotary.k_cache,
            v_cache=rotary.v_cache,
            slot_mapping=rotary.slot_mapping,
        )
        return out
    if activation is not None:
        if m == 1 and config is not None and config["kernel"] == "gemv_tc":
            params = {key: value for key, value in config.items() if key != "kernel"}
            return w4a16_gemv_tc(x, packed, scales, zeros, group_size, activation=activation, **params)
        from lm_torch.kernels.activation import gated_activation

        return gated_activation(w4a16_linear(x, packed, scales, zeros, group_size, tuning=tuning), activation)
    if config is not None:
        params = dict(config)
        kernel = params.pop("kernel")
        if kernel == "gemv" and m == 1:
            return w4a16_gemv(x, packed, scales, zeros, group_size, **params)
        if kernel == "gemv_tc" and m == 1:
            return w4a16_gemv_tc(x, packed, scales, zeros, group_size, **params)
        if kernel == "gemm":
            return w4a16_gemm(x, packed, scales, zeros, group_size, **params)
        if kernel == "dequant":
            return torch.nn.functional.linear(x, w4a16_dequantize(packed, scales, zeros, group_size, **params))
    num_blocks = k // block_inputs(group_size)
    if m == 1:
        if num_blocks % 16 == 0:
            # Two warps side by side along the 16 blocks: x's loads land in the tile's own layout (see the kernel).
            return w4a16_gemv(x, packed, scales, zeros, group_size, block_n=4, blocks=16, num_warps=2)
        blocks = next(b for b in (8, 4, 2, 1) if num_blocks % b == 0)
        return w4a16_gemv(x, packed, scales, zeros, group_size, block_n=16, blocks=blocks)
    if m <= 16:
        # Enough programs to cover the SMs twice: split K when N alone gives too few tiles (4+ blocks a split).
        tiles = triton.cdiv(n, 64)
        split = max(1, min(num_blocks // 4, triton.cdiv(2 * multiprocessor_count(x.device), tiles)))
        return w4a16_gemm(x, packed, scales, zeros, group_size, block_m=16, block_n=64, split_k=split)
    if m <= 64:
        return w4a16_gemm(x, packed, scales, zeros, group_size, block_m=64, block_n=64)
    return w4a16_gemm(x, packed, scales, zeros, group_size, block_m=128, block_n=64, num_stages=4)


def _gemv_tc_default(device: torch.device, outputs: int, num_blocks: int) -> dict:
    """The one-row launch of a shape the tuning table lacks, after the tuned winners (benchmarks/w4a16_notes.md):
    the tensor-core GEMV, 32 rows and 2 blocks a step, K split until about 16 programs per SM are in flight (at
    most 8 ways: qkv and o of Llama-3-8B get 8, gate_up 4, as tuned)."""
    blocks = 2 if num_blocks % 2 == 0 else 1
    row_blocks = triton.cdiv(outputs, 32)
    split = min(8, num_blocks // blocks, next_power_of_2(triton.cdiv(16 * multiprocessor_count(device), row_blocks)))
    return {"kernel": "gemv_tc", "block_n": 32, "blocks": blocks, "num_warps": 1, "split_k": max(1, split)}
