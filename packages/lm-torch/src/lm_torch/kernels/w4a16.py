"""W4A16 linears y = x @ W^T with 4-bit weights in groups along the inputs: the AWQ and GPTQ layers on CUDA.

One layout for both formats (`pack_int4` writes it; `layers.quant.weight_only` repacks checkpoints into it once):
    packed [N, K / 8] int32, K cut into blocks of B = min(group_size, 128) inputs, each block B / 8 words per row;
    word j of block b holds the 8 inputs b * B + t * (B / 8) + j (t = 0..7) in bits 4t .. 4t + 3;
    scales [K / group, N] and zeros [K / group, N] in the activation dtype (zeros are small integers, exact there):
    W[n, k] = (q[n, k] - zeros[k // group, n]) * scales[k // group, n].
Why the inputs of a word are B / 8 apart rather than adjacent: shifting a loaded tile of words by 4t gives "plane" t,
the weights of inputs b * B + t * (B / 8) + j for the tile's words j, which is a contiguous run of x. So each plane
meets a contiguous slice of x in the tile's own register layout (no shuffles between threads, 16-byte loads of both
operands), and a word never straddles two groups, so a block needs one scale and one zero per row.

Three kernels (the tuning table picks one per shape, `w4a16_linear`):
- `_w4a16_gemv_kernel`, one input row (batch-1 decode), meant to be bound by reading the packed weight (a quarter
  of the bf16 bytes) with cheap dequantization: a nibble becomes the float 1 + q / 16 by a shift and one AND-OR
  into the mantissa of 1.0 (`_plane`; an integer-to-float conversion runs at a quarter of the rate), one FMA with
  x, and the zero and scale are applied once per word and block. A loop step reads BLOCKS blocks side by side (a
  [BLOCK_N, BLOCKS, B / 8] tile of words), each thread holds several rows (reusing every x value it loads), and the
  next step's operands are requested before this step's arithmetic. On an H100 it reaches 1.0-1.5 TB/s at
  Llama-3-8B's shapes, 1.6-1.9x faster than the bf16 GEMV (`benchmarks/RESULTS.md`): with ~5 instructions per
  weight in the loop (SASS), issue limits it about as much as memory does.
- `_w4a16_gemv_tc_kernel`, one input row on the tensor cores: the halves of a word shifted by 4p, ANDed with
  0x000F000F and ORed with 0x43004300 (one LOP3 per two weights) are the bf16 numbers 128 + q of planes p and p + 4
  (fp16: 0x6400, 1024 + q), already paired as an mma operand register. A [BN, 2 W] tile of them times x (as an
  8-column operand of equal columns) accumulates sum (128 + q) x in float32 on the tensor cores, a second product
  with ones gives sum x, and each block adds (sum (128 + q) x - (128 + z) sum x) s. The dot's input order is chosen
  so that the words' own load (16 bytes per thread) is already the operand layout: no shared memory, no shuffles.
  ~1.5-2.5 SASS instructions per weight (64 to 16 rows a program) against ~5 for the GEMV above.
- `_w4a16_gemm_kernel`, more rows: a block's [BLOCK_N, 8, B / 8] planes are dequantized in registers into the
  activation dtype, viewed [BLOCK_N, B] (plane t, word j is input t * B / 8 + j: x's own order) and multiplied by
  BLOCK_M rows on the tensor cores; small M runs BLOCK_M = 16 with split-K so that enough programs stream the
  weight, large M (prefill) big tiles.
Split-K programs of `gemv` and `gemm` add float32 partial sums atomically (a zeroing and a cast launch around the
kernel); `gemv_tc`'s store theirs and the last split of a row block adds them up and writes the output (one launch,
deterministic order). Without split the result is stored directly (one launch).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lm_torch.kernels.activation import ACTIVATION_CODES, activate
from lm_torch.kernels.common import (
    arrives_last,
    check_cuda_or_interpreter,
    interpreting,
    multiprocessor_count,
    next_power_of_2,
    pdl_enabled,
    pdl_trigger,
    pdl_wait,
    persistent_zeros,
)

MAX_BLOCK = 128  # inputs of one interleaved block (fewer when the groups are smaller)


def block_inputs(group_size: int) -> int:
    """B, the inputs of one interleaved block of the layout, for a group size (which it must divide or equal)."""
    block = min(group_size, MAX_BLOCK)
    if block % 16 or group_size % block:
        raise ValueError(f"w4a16: group_size {group_size} must be a multiple of 16, and of 128 when larger")
    return block


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
def _tc_magic(words, p: tl.constexpr, MAGIC_BITS: tl.constexpr, ASM: tl.constexpr):
    """[.., C] int32 words -> nibble p of each 16-bit half ORed into MAGIC_BITS (both halves): in bf16 / fp16 each
    half reads MAGIC + q exactly. The AND-OR is one LOP3 in inline PTX; written in triton, LLVM splits it per half."""
    if p == 0:  # noqa: SIM108 - a compile-time branch
        moved = words
    else:
        moved = words >> (4 * p)  # the bits an arithmetic shift brings in are masked off below
    if ASM:
        if MAGIC_BITS == 0x43004300:
            return tl.inline_asm_elementwise(
                "lop3.b32 $0, $1, 0x000F000F, 0x43004300, 0xea;", "=r,r", [moved], dtype=tl.int32, is_pure=True, pack=1
            )
        return tl.inline_asm_elementwise(
            "lop3.b32 $0, $1, 0x000F000F, 0x64006400, 0xea;", "=r,r", [moved], dtype=tl.int32, is_pure=True, pack=1
        )
    return (moved & 0x000F000F) | MAGIC_BITS


@triton.jit
def _tc_operand(words, p: tl.constexpr, BLOCK_N: tl.constexpr, C: tl.constexpr, MAGIC_BITS: tl.constexpr, ASM):
    """Planes p and p + 4 of one block's words [4, BN, C] (word a * C + c of each row) as the dot's left operand
    [BN, 8 C], dot input kk = h + 2 (c % 2) + 4 a + 16 (c // 2) for plane p + 4 h of word a * C + c.
    Why this order: it is the register order of the words' own load (4 lanes along a, 8 along the rows, c and h in
    registers), read as the mma operand layout (kWidth 4: 4 consecutive kk per thread, the next 4 lanes' kk after),
    so the reshapes below move no data between threads, and no shared memory is used."""
    if MAGIC_BITS == 0:  # float32 (the interpreter): q itself, exact
        if p == 0:  # noqa: SIM108 - a compile-time branch
            moved = words
        else:
            moved = words >> (4 * p)
        pair = tl.join((moved & 0xF).to(tl.float32), ((moved >> 16) & 0xF).to(tl.float32))
    else:
        v = _tc_magic(words, p, MAGIC_BITS, ASM)  # [4, BN, C] int32: two halves MAGIC + q
        pair = tl.join(v.to(tl.int16), (v >> 16).to(tl.int16))  # [4, BN, C, 2]: h = 0 the low half
        if MAGIC_BITS == 0x43004300:  # noqa: SIM108 - a compile-time branch
            pair = pair.to(tl.bfloat16, bitcast=True)
        else:
            pair = pair.to(tl.float16, bitcast=True)
    pair = tl.permute(tl.reshape(pair, (4, BLOCK_N, C // 2, 2, 2)), (1, 2, 0, 3, 4))  # [BN, C/2, 4, 2, 2]
    return tl.reshape(pair, (BLOCK_N, 8 * C))


@triton.jit
def _tc_x(x_ptr, offsets, b, p: tl.constexpr, NCOL: tl.constexpr, C: tl.constexpr):
    """x for planes p, p + 4 of block b as the dot's right operand [8 C, NCOL] in `_tc_operand`'s input order, the
    same in every column (the product's columns are copies: N = 8 is the smallest mma tile)."""
    xs = tl.load(x_ptr + b * (32 * C) + p * (4 * C) + offsets)  # [4 (a), NCOL, 2 (h), C]
    xs = tl.permute(tl.reshape(xs, (4, NCOL, 2, C // 2, 2)), (3, 0, 4, 2, 1))  # [C/2, 4, 2 (c % 2), 2 (h), NCOL]
    return tl.reshape(xs, (8 * C, NCOL))


@triton.jit
def _tc_block_words(tile, bb: tl.constexpr, BLOCKS: tl.constexpr):
    """Block bb's words [4, BN, C] of a step's tile [4, BN, C, BLOCKS] (BLOCKS 1, 2 or 4: splits in registers)."""
    if BLOCKS == 1:
        return tl.reshape(tile, (tile.shape[0], tile.shape[1], tile.shape[2]))
    elif BLOCKS == 2:
        first, second = tl.split(tile)
        return first if bb == 0 else second
    else:
        evens, odds = tl.split(tl.reshape(tile, (tile.shape[0], tile.shape[1], tile.shape[2], 2, 2)))
        first, second = tl.split(evens if bb % 2 == 0 else odds)  # bb = 2 * (the second split) + (the first)
        return first if bb < 2 else second


@triton.jit
def _tc_step(w_ptrs, s_ptr, z_ptr, rows, bi, n, b0, WORDS: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr):
    """The words [4, BN, C, BLOCKS] and float32 scales and zeros [BN, BLOCKS] of the step starting at block b0."""
    groups = (b0 + bi) * BLOCK // GROUP  # [BLOCKS]
    sz_offsets = groups[None, :] * n + rows[:, None]  # [BN, BLOCKS]
    words = tl.load(w_ptrs + b0 * WORDS)
    return words, tl.load(s_ptr + sz_offsets).to(tl.float32), tl.load(z_ptr + sz_offsets).to(tl.float32)


@triton.jit
def _tc_accumulate(
    acc,
    cur_words,
    cur_s,
    cur_z,
    b0,
    x_ptr,
    x_offsets,
    ones,
    bi,
    BLOCK_N: tl.constexpr,
    C: tl.constexpr,
    BLOCKS: tl.constexpr,
    MAGIC_BITS: tl.constexpr,
    MAGIC: tl.constexpr,
    ASM,
    UPCAST: tl.constexpr,
):
    """acc [BN, NCOL] + the step at block b0: its words [4, BN, C, BLOCKS], scales and zeros [BN, BLOCKS]."""
    NCOL: tl.constexpr = 8
    for bb in tl.static_range(BLOCKS):
        block_words = _tc_block_words(cur_words, bb, BLOCKS)  # [4, BN, C]
        part = tl.zeros([BLOCK_N, NCOL], tl.float32)  # sum over the block of (MAGIC + q) x
        x_sum = tl.zeros([BLOCK_N, NCOL], tl.float32)  # sum of the block's x, from the tensor cores too
        for p in tl.static_range(4):
            xs = _tc_x(x_ptr, x_offsets, b0 + bb, p, NCOL, C)
            w = _tc_operand(block_words, p, BLOCK_N, C, MAGIC_BITS, ASM)
            if UPCAST:  # exact: the products of two 16-bit floats are float32 numbers
                part = tl.dot(w.to(tl.float32), xs.to(tl.float32), part)
                x_sum = tl.dot(ones.to(tl.float32), xs.to(tl.float32), x_sum)
            else:
                part = tl.dot(w, xs, part)
                x_sum = tl.dot(ones, xs, x_sum)
        # [BN] scale and zero of this block: one-hot selection over the step's BLOCKS (compile-time).
        s_b = tl.sum(tl.where(bi[None, :] == bb, cur_s, 0.0), 1)
        z_b = tl.sum(tl.where(bi[None, :] == bb, cur_z, 0.0), 1)
        # sum (q - z) x = sum (MAGIC + q) x - (MAGIC + z) sum x, in float32 (MAGIC x is exact in the products).
        acc += (part - (MAGIC + z_b)[:, None] * x_sum) * s_b[:, None]
    return acc


@triton.jit
def _w4a16_gemv_tc_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    partial_ptr,  # [splits, N] float32: each split's sums (split-K only)
    counters_ptr,  # [>= cdiv(N, BLOCK_N)] int32, zero on entry and on exit (split-K only)
    n,
    words_per_row,
    blocks_per_split,
    # ROTARY only (else placeholders): the token's position and cache slot, the cos / sin tables [positions,
    # head_dim] and their row stride, the k and v caches [blocks, BLOCK_SIZE, kv heads, head_dim] and their
    # block, slot and head strides, the numbers of query and kv heads.
    positions_ptr,
    slot_ptr,
    cos_ptr,
    sin_ptr,
    stride_cos,
    k_cache_ptr,
    v_cache_ptr,
    stride_cb,
    stride_cs,
    stride_ch,
    num_heads,
    num_kv_heads,
    GROUP: tl.constexpr,
    BLOCK: tl.constexpr,  # inputs of an interleaved block, 64 or 128
    BLOCK_N: tl.constexpr,
    BLOCKS: tl.constexpr,  # blocks per loop step (blocks_per_split is a multiple)
    PREFETCH: tl.constexpr,  # load step i + 1's words, scales and zeros while computing step i
    SPLITS_PAD: tl.constexpr,  # the split count padded to a power of two; 1: no split-K
    MAGIC_BITS: tl.constexpr,  # 0x43004300 (bf16), 0x64006400 (fp16), 0 (float32: the interpreter)
    MAGIC: tl.constexpr,  # the value of the magic half alone: 128.0, 1024.0, 0.0
    ASM: tl.constexpr,  # inline PTX for the dequantizing LOP3 (compiled on CUDA)
    UPCAST: tl.constexpr,  # 16-bit operands multiplied in float32 (the interpreter's bf16 dot is wrong)
    PDL: tl.constexpr,  # launched with programmatic dependent launch: the first weights load before the wait
    GATED: tl.constexpr,  # -1: plain; else W is [gate | up] (N / 2 rows each) and out gets act(gate) * up, ACT code
    PRELOAD: tl.constexpr,  # steps loaded before the PDL wait: 1, or 2 (with PREFETCH)
    ROTARY: tl.constexpr,  # W is a [q | k | v] projection: rotate q and k (neox pairs) and store k and v in the cache
    HEAD_DIM: tl.constexpr,  # with ROTARY
    BLOCK_SIZE: tl.constexpr,  # with ROTARY: the cache's tokens per block
):
    WORDS: tl.constexpr = BLOCK // 8
    C: tl.constexpr = WORDS // 4  # words of a row per lane and block
    NCOL: tl.constexpr = 8
    HALF: tl.constexpr = BLOCK_N // 2
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    if GATED >= 0:
        # The first half of the block's rows are gate rows, the second the up rows of the same outputs.
        r = tl.arange(0, BLOCK_N)
        rows = pid_n * HALF + r % HALF + (r >= HALF).to(tl.int32) * (n // 2)  # [BN]
    elif ROTARY:
        # HALF features d of one head and their rotary partners d + HEAD_DIM / 2 (a head takes HEAD_DIM / BLOCK_N
        # row blocks, in order).
        r = tl.arange(0, BLOCK_N)
        per_head: tl.constexpr = HEAD_DIM // BLOCK_N
        first_row = (pid_n // per_head) * HEAD_DIM + (pid_n % per_head) * HALF
        rows = first_row + r % HALF + (r >= HALF).to(tl.int32) * (HEAD_DIM // 2)  # [BN]
    else:
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    # Rows past N read row N - 1 (loads stay unmasked and vectorized); their sums are not stored.
    safe_rows = tl.minimum(rows, n - 1)
    bi = tl.arange(0, BLOCKS)
    ai = tl.arange(0, 4)
    ci = tl.arange(0, C)
    # [4 (a), BN, C, BLOCKS]: word a * C + c of block bb of the step. a before the rows, c last (contiguous) and bb
    # after the rows: triton then gives the lanes a and the rows, and each thread C contiguous words per block.
    word_offsets = ai[:, None, None, None] * C + ci[None, None, :, None] + bi[None, None, None, :] * WORDS
    w_ptrs = w_ptr + safe_rows[None, :, None, None].to(tl.int64) * words_per_row + word_offsets
    # [4 (a), NCOL, 2 (h), C]: x of plane p + 4 h of word a * C + c is x[b * B + (p + 4 h) * W + a * C + c].
    x_offsets = (
        ai[:, None, None, None] * C
        + (tl.arange(0, 2) * (4 * WORDS))[None, None, :, None]
        + ci[None, None, None, :]
        + tl.zeros([4, NCOL, 2, C], tl.int32)
    )
    one = tl.full([BLOCK_N, 4 * C], 1.0, tl.float32).to(x_ptr.dtype.element_ty)  # (the interpreter has no bf16 full)
    # Joined like the weight operand so that both dots use the same operand layout for x (kWidth 4).
    ones = tl.reshape(tl.join(one, one), (BLOCK_N, 8 * C))
    first = pid_k * blocks_per_split
    last = tl.minimum(first + blocks_per_split, words_per_row // WORDS)
    acc = tl.zeros([BLOCK_N, NCOL], tl.float32)
    start = first
    if PREFETCH:
        words, s, z = _tc_step(w_ptrs, s_ptr, z_ptr, safe_rows, bi, n, first, WORDS, BLOCK, GROUP)
        if PRELOAD == 2:  # the second step too (a one-step split loads its own blocks again: unused)
            words2, s2, z2 = _tc_step(
                w_ptrs, s_ptr, z_ptr, safe_rows, bi, n, tl.minimum(first + BLOCKS, last - BLOCKS), WORDS, BLOCK, GROUP
            )
    # Weights, scales and zeros are never written: the loads above may overlap the kernel before this one
    # (programmatic dependent launch). x, the outputs and the split-K buffers only after it has finished.
    pdl_wait(PDL)
    pdl_trigger(PDL)
    if PREFETCH and PRELOAD == 2:
        acc = _tc_accumulate(
            acc, words, s, z, first, x_ptr, x_offsets, ones, bi, BLOCK_N, C, BLOCKS, MAGIC_BITS, MAGIC, ASM, UPCAST
        )
        start = first + 2 * BLOCKS
        # The first step of the loop below (past the end when there is none: in bounds, unused).
        words, s, z = _tc_step(
            w_ptrs, s_ptr, z_ptr, safe_rows, bi, n, tl.minimum(start, last - BLOCKS), WORDS, BLOCK, GROUP
        )
        if first + BLOCKS < last:
            acc = _tc_accumulate(
                acc,
                words2,
                s2,
                z2,
                first + BLOCKS,
                x_ptr,
                x_offsets,
                ones,
                bi,
                BLOCK_N,
                C,
                BLOCKS,
                MAGIC_BITS,
                MAGIC,
                ASM,
                UPCAST,
            )
    for b0 in range(start, last, BLOCKS):
        if PREFETCH:
            cur_words, cur_s, cur_z = words, s, z
            following = tl.minimum(b0 + BLOCKS, last - BLOCKS)  # the last step fetches its own blocks again
            words, s, z = _tc_step(w_ptrs, s_ptr, z_ptr, safe_rows, bi, n, following, WORDS, BLOCK, GROUP)
        else:
            cur_words, cur_s, cur_z = _tc_step(w_ptrs, s_ptr, z_ptr, safe_rows, bi, n, b0, WORDS, BLOCK, GROUP)
        acc = _tc_accumulate(
            acc,
            cur_words,
            cur_s,
            cur_z,
            b0,
            x_ptr,
            x_offsets,
            ones,
            bi,
            BLOCK_N,
            C,
            BLOCKS,
            MAGIC_BITS,
            MAGIC,
            ASM,
            UPCAST,
        )
    # The NCOL columns are copies of one sum (x is the same in every column): max picks one exactly.
    total = tl.max(acc, 1)  # [BN]
    if GATED >= 0:  # noqa: SIM108 - a compile-time branch
        row_mask = (pid_n * HALF + tl.arange(0, BLOCK_N) % HALF) < n // 2
    else:
        row_mask = rows < n
    if SPLITS_PAD == 1:
        _tc_finish(
            out_ptr,
            total,
            rows,
            row_mask,
            pid_n,
            n,
            HALF,
            GATED,
            ROTARY,
            positions_ptr,
            slot_ptr,
            cos_ptr,
            sin_ptr,
            stride_cos,
            k_cache_ptr,
            v_cache_ptr,
            stride_cb,
            stride_cs,
            stride_ch,
            num_heads,
            num_kv_heads,
            HEAD_DIM,
            BLOCK_SIZE,
        )
    else:
        # Split-K in one launch: each split stores its sums; the last of a row block's splits to arrive adds them
        # in split order (deterministic) and writes the output. No zeroing or cast launches, no float atomics.
        num_splits = tl.num_programs(1)
        tl.store(partial_ptr + pid_k * n + rows, total, mask=row_mask)
        counter = counters_ptr + pid_n
        if arrives_last(counter, num_splits):
            splits = tl.arange(0, SPLITS_PAD)
            parts = tl.load(
                partial_ptr + splits[:, None] * n + rows[None, :],
                mask=(splits < num_splits)[:, None] & row_mask[None, :],
                other=0.0,
                cache_modifier=".cg",
            )  # [SPLITS_PAD, BN]
            _tc_finish(
                out_ptr,
                tl.sum(parts, 0),
                rows,
                row_mask,
                pid_n,
                n,
                HALF,
                GATED,
                ROTARY,
                positions_ptr,
                slot_ptr,
                cos_ptr,
                sin_ptr,
                stride_cos,
                k_cache_ptr,
                v_cache_ptr,
                stride_cb,
                stride_cs,
                stride_ch,
                num_heads,
                num_kv_heads,
                HEAD_DIM,
                BLOCK_SIZE,
            )
            tl.store(counter, 0)  # the next launch (next layer, next graph replay) counts from zero again


@triton.jit
def _tc_finish(
    out_ptr,
    total,
    rows,
    row_mask,
    pid_n,
    n,
    HALF: tl.constexpr,
    GATED: tl.constexpr,
    ROTARY: tl.constexpr,
    positions_ptr,
    slot_ptr,
    cos_ptr,
    sin_ptr,
    stride_cos,
    k_cache_ptr,
    v_cache_ptr,
    stride_cb,
    stride_cs,
    stride_ch,
    num_heads,
    num_kv_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """A row block's float32 sums [BN] to their outputs: plain, gated, or rotated and stored into the cache."""
    if ROTARY:
        _tc_store_rotary(
            out_ptr,
            total,
            pid_n,
            HALF,
            positions_ptr,
            slot_ptr,
            cos_ptr,
            sin_ptr,
            stride_cos,
            k_cache_ptr,
            v_cache_ptr,
            stride_cb,
            stride_cs,
            stride_ch,
            num_heads,
            num_kv_heads,
            HEAD_DIM,
            BLOCK_SIZE,
        )
    else:
        _tc_store(out_ptr, total, rows, row_mask, pid_n, n, HALF, GATED)


@triton.jit
def _tc_store_rotary(
    out_ptr,
    total,
    pid_n,
    HALF: tl.constexpr,
    positions_ptr,
    slot_ptr,
    cos_ptr,
    sin_ptr,
    stride_cos,
    k_cache_ptr,
    v_cache_ptr,
    stride_cb,
    stride_cs,
    stride_ch,
    num_heads,
    num_kv_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Features d and d + HEAD_DIM / 2 (d in this block's HALF) of one head of the [q | k | v] row: rounded to the
    output dtype (what the GEMV alone would write), rotated in float32 if a q or k head (what `kernels.rotary`
    computes, same rounding), stored to the output and, for k and v heads, into the cache at the token's slot
    (negative: a padding row, nothing stored)."""
    first, second = tl.split(tl.permute(tl.reshape(total, (2, HALF)), (1, 0)))  # [HALF] each
    a = first.to(out_ptr.dtype.element_ty).to(tl.float32)
    b = second.to(out_ptr.dtype.element_ty).to(tl.float32)
    per_head: tl.constexpr = HEAD_DIM // (2 * HALF)
    head = pid_n // per_head
    d = (pid_n % per_head) * HALF + tl.arange(0, HALF)
    position = tl.load(positions_ptr).to(tl.int64)
    c = tl.load(cos_ptr + position * stride_cos + d).to(tl.float32)
    s = tl.load(sin_ptr + position * stride_cos + d).to(tl.float32)
    is_v = head >= num_heads + num_kv_heads
    y1 = tl.where(is_v, a, a * c - b * s).to(out_ptr.dtype.element_ty)
    y2 = tl.where(is_v, b, b * c + a * s).to(out_ptr.dtype.element_ty)
    row = out_ptr + head * HEAD_DIM + d
    tl.store(row, y1)
    tl.store(row + HEAD_DIM // 2, y2)
    slot = tl.load(slot_ptr).to(tl.int64)
    kv_head = (head - num_heads) % num_kv_heads  # (meaningless for a q head: masked off)
    at = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + kv_head * stride_ch + d
    # Masks as comparisons of [HALF] vectors (boolean on every backend, the interpreter included).
    heads = tl.zeros([HALF], tl.int64) + head
    slots = tl.zeros([HALF], tl.int64) + slot
    store_k = (slots >= 0) & (heads >= num_heads) & (heads < num_heads + num_kv_heads)
    store_v = (slots >= 0) & (heads >= num_heads + num_kv_heads)
    tl.store(k_cache_ptr + at, y1.to(k_cache_ptr.dtype.element_ty), mask=store_k)
    tl.store(k_cache_ptr + at + HEAD_DIM // 2, y2.to(k_cache_ptr.dtype.element_ty), mask=store_k)
    tl.store(v_cache_ptr + at, y1.to(v_cache_ptr.dtype.element_ty), mask=store_v)
    tl.store(v_cache_ptr + at + HEAD_DIM // 2, y2.to(v_cache_ptr.dtype.element_ty), mask=store_v)


@triton.jit
def _tc_store(out_ptr, total, rows, row_mask, pid_n, n, HALF: tl.constexpr, GATED: tl.constexpr):
    """Store a row block's float32 sums [BN]; gated, act(gate) * up of its HALF outputs, each rounded to the
    output dtype first as the separate GEMV and activation kernels would (same numbers)."""
    if GATED >= 0:
        gate, up = tl.split(tl.permute(tl.reshape(total, (2, HALF)), (1, 0)))  # [HALF] each
        gate = gate.to(out_ptr.dtype.element_ty).to(tl.float32)
        up = up.to(out_ptr.dtype.element_ty).to(tl.float32)
        outs = pid_n * HALF + tl.arange(0, HALF)
        tl.store(out_ptr + outs, (activate(gate, GATED) * up).to(out_ptr.dtype.element_ty), mask=outs < n // 2)
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


def _check(x, packed, scales, zeros, group_size) -> tuple[int, int, int, int]:
    """(M, N, K, B) of a call, or a ValueError naming what does not fit."""
    check_cuda_or_interpreter(x, packed, scales, zeros)
    if x.dim() != 2 or packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"w4a16: x {tuple(x.shape)} must be [M, K] and packed {tuple(packed.shape)} [N, K/8] int32")
    m, k = x.shape
    n = packed.shape[0]
    block = block_inputs(group_size)
    if k % group_size or packed.shape[1] * 8 != k:
        raise ValueError(f"w4a16: K={k} must be a multiple of group_size {group_size} and 8x packed's columns")
    groups = k // group_size
    if scales.shape != (groups, n) or zeros.shape != (groups, n):
        raise ValueError(f"w4a16: scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} must be {(groups, n)}")
    if not (x.is_contiguous() and packed.is_contiguous() and scales.is_contiguous() and zeros.is_contiguous()):
        raise ValueError("w4a16: x and the packed weight, scales and zeros must be contiguous")
    return m, n, k, block


def _splits(num_blocks: int, step: int, split_k: int) -> tuple[int, int]:
    """(blocks per split, a multiple of the blocks a loop step takes, and the number of splits)."""
    if num_blocks % step:
        raise ValueError(f"w4a16: blocks {step} per step do not divide the {num_blocks} blocks of K")
    per_split = triton.cdiv(triton.cdiv(num_blocks, split_k), step) * step
    return per_split, triton.cdiv(num_blocks, per_split)


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
    m, n, k, block = _check(x, packed, scales, zeros, group_size)
    if m != 1:
        raise ValueError(f"w4a16_gemv: x has {m} rows, expected 1 (w4a16_gemm takes more)")
    per_split, splits = _splits(k // block, blocks, split_k)
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
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out.to(x.dtype) if splits > 1 else out


class QKVRotary(NamedTuple):
    """What a [q | k | v] projection of one token needs to finish the token's rotary and KV-cache write itself:
    rotate q and k (neox pairs, the full head) by `positions[0]` with the tables `cos`, `sin` [positions, head_dim],
    and write the rotated k and v at cache slot `slot_mapping[0]` (negative: none) of the unquantized caches."""

    positions: torch.Tensor  # [1]
    cos: torch.Tensor  # [max_positions, head_dim]
    sin: torch.Tensor
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor  # [1]
    num_heads: int
    num_kv_heads: int
    head_dim: int


def _check_rotary(rotary: QKVRotary, n: int, block_n: int) -> None:
    heads, kv_heads, dim = rotary.num_heads, rotary.num_kv_heads, rotary.head_dim
    if n != (heads + 2 * kv_heads) * dim:
        raise ValueError(
            f"w4a16_gemv_tc: N={n} is not (num_heads + 2 num_kv_heads) x head_dim ({heads}, {kv_heads}, {dim})"
        )
    if dim % block_n:
        raise ValueError(f"w4a16_gemv_tc: head_dim {dim} is no multiple of block_n {block_n} (rotary pairs)")
    if (
        rotary.cos.shape[-1] != dim
        or rotary.sin.shape != rotary.cos.shape
        or rotary.cos.stride() != rotary.sin.stride()
    ):
        raise ValueError(f"w4a16_gemv_tc: rotary tables {tuple(rotary.cos.shape)} are not [positions, {dim}]")
    caches = (rotary.k_cache, rotary.v_cache)
    if any(c.dim() != 4 or tuple(c.shape[2:]) != (kv_heads, dim) or c.stride(3) != 1 for c in caches):
        raise ValueError(
            f"w4a16_gemv_tc: caches {tuple(rotary.k_cache.shape)} are not [blocks, size, {kv_heads}, {dim}]"
        )
    if rotary.k_cache.stride() != rotary.v_cache.stride() or rotary.k_cache.dtype == torch.uint8:
        raise ValueError("w4a16_gemv_tc: the k and v caches must be unquantized and laid out alike")
    if rotary.positions.numel() != 1 or rotary.slot_mapping.numel() != 1:
        raise ValueError("w4a16_gemv_tc: one token's position and slot")


# The halves MAGIC + q of `_tc_magic` by activation dtype: (both halves' bits, MAGIC). float32 takes q directly.
_TC_MAGIC = {torch.bfloat16: (0x43004300, 128.0), torch.float16: (0x64006400, 1024.0), torch.float32: (0, 0.0)}


def w4a16_gemv_tc(
    x: torch.Tensor,  # [1, K] bf16 / fp16 (float32 under the interpreter)
    packed: torch.Tensor,  # [N, K / 8] int32 in the `pack_int4` layout
    scales: torch.Tensor,  # [K / group_size, N]
    zeros: torch.Tensor,  # [K / group_size, N]
    group_size: int,
    *,
    block_n: int = 32,
    blocks: int = 1,
    num_warps: int = 1,
    split_k: int = 1,
    prefetch: bool = True,
    activation: str | None = None,
    preload: int = 2,
    rotary: QKVRotary | None = None,
) -> torch.Tensor:  # [1, N] in x's dtype ([1, N / 2] with an activation)
    """x @ W^T for one row x on the tensor cores: each block's nibbles become MAGIC + q in x's dtype (one LOP3 per
    two weights) and multiply x in mma tiles; per block, float32 sum (q - z) x = sum (MAGIC + q) x - (MAGIC + z)
    sum x, times the scale. Groups of 64 inputs or more (blocks of 64 or 128).

    `activation` (a name of `kernels.activation.ACTIVATION_CODES`): W is a fused [gate | up] projection and the
    result is act(gate) * up, computed as the last step of the same kernel (no activation launch).

    `preload`: steps of weights a program loads before it waits for the kernel before it (1 or 2; programmatic
    dependent launch on sm_90+: those loads overlap the earlier kernel).

    `rotary`: W is a [q | k | v] projection; the kernel's last step rotates q and k and writes k and v into the
    cache (what `kernels.rotary.apply_rotary` with the caches does next, same numbers), and returns the rotated row."""
    m, n, k, block = _check(x, packed, scales, zeros, group_size)
    if m != 1:
        raise ValueError(f"w4a16_gemv_tc: x has {m} rows, expected 1 (w4a16_gemm takes more)")
    if block < 64:
        raise ValueError(f"w4a16_gemv_tc: group_size {group_size} < 64 (blocks of 64 or 128 inputs only)")
    if preload not in (1, 2):
        raise ValueError(f"w4a16_gemv_tc: preload {preload} must be 1 or 2")
    if blocks not in (1, 2, 4) or block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"w4a16_gemv_tc: blocks {blocks} must be 1, 2 or 4, block_n {block_n} a power of 2 >= 16")
    if x.dtype not in _TC_MAGIC:
        raise ValueError(f"w4a16_gemv_tc: x dtype {x.dtype} is not bf16, fp16 or float32")
    gated = -1
    if activation is not None:
        if activation not in ACTIVATION_CODES:
            raise ValueError(f"w4a16_gemv_tc: activation {activation!r} is not one of {', '.join(ACTIVATION_CODES)}")
        if n % 2:
            raise ValueError(f"w4a16_gemv_tc: a gated projection needs an even N ([gate | up]), got {n}")
        gated = ACTIVATION_CODES[activation]
    if rotary is not None:
        if gated >= 0:
            raise ValueError("w4a16_gemv_tc: a projection is gated or rotary, not both")
        _check_rotary(rotary, n, block_n)
    magic_bits, magic = _TC_MAGIC[x.dtype]
    pdl = pdl_enabled(x.device)
    per_split, splits = _splits(k // block, blocks, split_k)
    # Gated: a block of block_n rows makes block_n / 2 outputs.
    row_blocks = triton.cdiv(n // 2, block_n // 2) if gated >= 0 else triton.cdiv(n, block_n)
    out = x.new_empty((1, n // 2 if gated >= 0 else n))
    # Split-K partial sums and arrival counters; one split touches neither (placeholders of the same dtypes).
    partials = persistent_zeros(x.device, "w4a16_gemv_tc partials", splits * n if splits > 1 else 1, torch.float32)
    counters = persistent_zeros(x.device, "w4a16_gemv_tc counters", row_blocks if splits > 1 else 1)
    _w4a16_gemv_tc_kernel[(row_blocks, splits)](
        x,
        packed,
        scales,
        zeros,
        out,
        partials,
        counters,
        n,
        k // 8,
        per_split,
        *_rotary_args(rotary, out),
        GROUP=group_size,
        BLOCK=block,
        BLOCK_N=block_n,
        BLOCKS=blocks,
        PREFETCH=prefetch,
        SPLITS_PAD=next_power_of_2(splits) if splits > 1 else 1,
        MAGIC_BITS=magic_bits,
        MAGIC=magic,
        ASM=not interpreting(),
        UPCAST=interpreting() and x.dtype == torch.bfloat16,
        PDL=pdl,
        GATED=gated,
        PRELOAD=2 if preload == 2 and prefetch and per_split >= 2 * blocks else 1,
        ROTARY=rotary is not None,
        HEAD_DIM=rotary.head_dim if rotary is not None else 1,
        BLOCK_SIZE=rotary.k_cache.shape[1] if rotary is not None else 1,
        num_warps=num_warps,
        num_stages=1,
        **({"launch_pdl": True} if pdl else {}),
    )
    return out


def _rotary_args(rotary: QKVRotary | None, placeholder: torch.Tensor) -> tuple:
    """The kernel's ROTARY arguments (placeholders without: never read)."""
    if rotary is None:
        return (placeholder, placeholder, placeholder, placeholder, 0, placeholder, placeholder, 0, 0, 0, 0, 1)
    cache = rotary.k_cache
    return (
        rotary.positions,
        rotary.slot_mapping,
        rotary.cos,
        rotary.sin,
        rotary.cos.stride(0),
        rotary.k_cache,
        rotary.v_cache,
        cache.stride(0),
        cache.stride(1),
        cache.stride(2),
        rotary.num_heads,
        rotary.num_kv_heads,
    )


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
    m, n, k, block = _check(x, packed, scales, zeros, group_size)
    per_split, splits = _splits(k // block, 1, split_k)
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
        num_warps=num_warps,
        num_stages=num_stages,
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
    _check(packed.new_empty((0, k), dtype=scales.dtype), packed, scales, zeros, group_size)
    block = block_inputs(group_size)
    out = torch.empty((n, k), dtype=scales.dtype, device=packed.device)
    _w4a16_dequant_kernel[(triton.cdiv(n, block_n), k // block)](
        packed, scales, zeros, out, n, k, GROUP=group_size, BLOCK=block, BLOCK_N=block_n
    )
    return out


TUNING_ENV = "LM_TORCH_W4A16_TUNING"


@functools.cache
def tuned_configs() -> dict[str, dict]:
    """Launch shapes by "rows bucket:N:K:group_size" (buckets 1, 16, 64, 2048 for M = 1, <= 16, <= 64, more), from
    the JSON `benchmarks/w4a16.py --write-tuning` writes: the file named by $LM_TORCH_W4A16_TUNING, else the one
    shipped next to this module (measured on an H100 at Llama-3-8B's shapes). Shapes absent from it get
    `w4a16_linear`'s defaults."""
    path = os.environ.get(TUNING_ENV) or Path(__file__).with_name("w4a16_tuning.json")
    try:
        return json.loads(Path(path).read_text())["configs"]
    except FileNotFoundError:
        return {}


def rows_bucket(m: int) -> int:
    """The tuning table's bucket of a row count."""
    return 1 if m == 1 else 16 if m <= 16 else 64 if m <= 64 else 2048


def w4a16_linear(
    x, packed, scales, zeros, group_size: int, activation: str | None = None, rotary: QKVRotary | None = None
) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N]: the launch shape of `tuned_configs` for (M's bucket, N, K, group_size), else the
    GEMV for one row, the split-K tensor-core kernel for a few rows, large tiles for prefill.

    `activation`: W is a fused [gate | up] projection; returns act(gate) * up [M, N / 2], inside the GEMV where it
    runs on the tensor cores (one row), else by the activation kernel after the product.

    `rotary` (one row): W is a [q | k | v] projection; returns the row with q and k rotated, k and v written into
    the cache: in the GEMV's last step where it runs on the tensor cores, else by `apply_rotary` after the product."""
    m, k = x.shape
    n = packed.shape[0]
    config = tuned_configs().get(f"{rows_bucket(m)}:{n}:{k}:{group_size}")
    if m == 1 and config is None and block_inputs(group_size) >= 64:
        config = _gemv_tc_default(x.device, n // 2 if activation else n, k // block_inputs(group_size))
    if rotary is not None:
        if m != 1:
            raise ValueError(f"w4a16_linear: the rotary epilogue takes one row, got {m}")
        if config is not None and config["kernel"] == "gemv_tc" and rotary.head_dim % config["block_n"] == 0:
            params = {key: value for key, value in config.items() if key != "kernel"}
            return w4a16_gemv_tc(x, packed, scales, zeros, group_size, rotary=rotary, **params)
        from lm_torch.kernels.rotary import apply_rotary

        out = w4a16_linear(x, packed, scales, zeros, group_size)
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

        return gated_activation(w4a16_linear(x, packed, scales, zeros, group_size), activation)
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
    """The one-row launch of a shape the tuning table lacks, after the H100's winners (benchmarks/w4a16_notes.md):
    the tensor-core GEMV, 32 rows and 2 blocks a step, K split until about 16 programs per SM are in flight (at
    most 8 ways: qkv and o of Llama-3-8B get 8, gate_up 4, as tuned)."""
    blocks = 2 if num_blocks % 2 == 0 else 1
    row_blocks = triton.cdiv(outputs, 32)
    split = min(8, num_blocks // blocks, next_power_of_2(triton.cdiv(16 * multiprocessor_count(device), row_blocks)))
    return {"kernel": "gemv_tc", "block_n": 32, "blocks": blocks, "num_warps": 1, "split_k": max(1, split)}


def pack_int4(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """q [N, K] integers in [0, 16) -> [N, K / 8] int32 words in the layout above (blocks of min(group, 128))."""
    n, k = q.shape
    block = block_inputs(group_size)
    if k % group_size:
        raise ValueError(f"pack_int4: K={k} is no multiple of group_size {group_size}")
    # [N, blocks, t, j] -> [N, blocks, j, t]: word j of a block gathers the inputs t * (B / 8) + j.
    planes = q.reshape(n, k // block, 8, block // 8).transpose(2, 3).reshape(n, k // 8, 8)
    shifts = torch.arange(8, device=q.device, dtype=torch.int64) * 4
    words = (planes.to(torch.int64) << shifts).sum(-1)  # [N, K / 8] in [0, 2^32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
