"""The one-row W4A16 GEMV on the tensor cores (`w4a16_gemv_tc`; `lm_torch.kernels.w4a16.w4a16_linear` picks it by
shape), over the `lm_torch.kernels.w4a16_layout` packing.

The halves of a word shifted by 4p, ANDed with 0x000F000F and ORed with 0x43004300 (one LOP3 per two weights) are the
bf16 numbers 128 + q of planes p and p + 4 (fp16: 0x6400, 1024 + q), already paired as an mma operand register. A
[BN, 2 W] tile of them times x (as an 8-column operand of equal columns) accumulates sum (128 + q) x in float32 on
the tensor cores, a second product with ones gives sum x, and each block adds (sum (128 + q) x - (128 + z) sum x) s.
The dot's input order is chosen so that the words' own load (16 bytes per thread) is already the operand layout: no
shared memory, no shuffles. ~1.5-2.5 SASS instructions per weight (64 to 16 rows a program).

Split-K programs store their partial sums and the last split of a row block adds them up (one launch, deterministic
order). That last step can do more than store: with `activation` on a fused [gate | up] projection it writes
act(gate) * up (no activation launch), and with `rotary` (`QKVRotary`) on a [q | k | v] projection of one token it
rotates q and k and writes k and v into the paged cache (no rotary launch). With programmatic dependent launch the
kernel loads `preload` steps of weights before it waits for the kernel before it.
"""

# Triton's type stubs describe host Python, not the @triton.jit language, so these rules are off here:
# reportArgumentType: `tl.constexpr` parameters are typed as the class `constexpr`, so the plain values passed to them
#   are rejected.
# reportAssignmentType: a value assigned to a name annotated `tl.constexpr` is rejected the same way.
# reportGeneralTypeIssues: `tl.range` / `tl.static_range` are typed as not iterable.
# reportOperatorIssue: `tl` reductions and loads are typed `tensor | tuple`, so arithmetic on their results is
#   rejected.
# pyright: reportArgumentType=false, reportAssignmentType=false, reportGeneralTypeIssues=false, reportOperatorIssue=false

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lm_torch.kernels.activation import ACTIVATION_CODES, activate
from lm_torch.kernels.common import (
    arrives_last,
    interpreting,
    next_power_of_2,
    pdl_enabled,
    pdl_trigger,
    pdl_wait,
    persistent_zeros,
)
from lm_torch.kernels.w4a16_layout import check_call, split_blocks


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
    step,
    b0,
    x_operands,
    BLOCK_N: tl.constexpr,
    C: tl.constexpr,
    BLOCKS: tl.constexpr,
    MAGIC_BITS: tl.constexpr,
    MAGIC: tl.constexpr,
    ASM,
    UPCAST: tl.constexpr,
):
    """acc [BN, NCOL] + the step at block b0: `step` is its words [4, BN, C, BLOCKS], scales and zeros [BN, BLOCKS]
    (`_tc_step`), `x_operands` (x_ptr, x's offsets, the ones operand, the step's block indices)."""
    NCOL: tl.constexpr = 8
    cur_words, cur_s, cur_z = step
    x_ptr, x_offsets, ones, bi = x_operands
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
    x_operands = (x_ptr, x_offsets, ones, bi)
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
        acc = _tc_accumulate(acc, (words, s, z), first, x_operands, BLOCK_N, C, BLOCKS, MAGIC_BITS, MAGIC, ASM, UPCAST)
        start = first + 2 * BLOCKS
        # The first step of the loop below (past the end when there is none: in bounds, unused).
        words, s, z = _tc_step(
            w_ptrs, s_ptr, z_ptr, safe_rows, bi, n, tl.minimum(start, last - BLOCKS), WORDS, BLOCK, GROUP
        )
        if first + BLOCKS < last:
            acc = _tc_accumulate(
                acc, (words2, s2, z2), first + BLOCKS, x_operands, BLOCK_N, C, BLOCKS, MAGIC_BITS, MAGIC, ASM, UPCAST
            )
    for b0 in range(start, last, BLOCKS):
        if PREFETCH:
            cur_words, cur_s, cur_z = words, s, z
            following = tl.minimum(b0 + BLOCKS, last - BLOCKS)  # the last step fetches its own blocks again
            words, s, z = _tc_step(w_ptrs, s_ptr, z_ptr, safe_rows, bi, n, following, WORDS, BLOCK, GROUP)
        else:
            cur_words, cur_s, cur_z = _tc_step(w_ptrs, s_ptr, z_ptr, safe_rows, bi, n, b0, WORDS, BLOCK, GROUP)
        acc = _tc_accumulate(
            acc, (cur_words, cur_s, cur_z), b0, x_operands, BLOCK_N, C, BLOCKS, MAGIC_BITS, MAGIC, ASM, UPCAST
        )
    # The NCOL columns are copies of one sum (x is the same in every column): max picks one exactly.
    total = tl.max(acc, 1)  # [BN]
    if GATED >= 0:  # noqa: SIM108 - a compile-time branch
        row_mask = (pid_n * HALF + tl.arange(0, BLOCK_N) % HALF) < n // 2
    else:
        row_mask = rows < n
    rotary_args = (
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
    )
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
            rotary_args,
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
                rotary_args,
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
    rotary_args,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """A row block's float32 sums [BN] to their outputs: plain, gated, or rotated and stored into the cache
    (`rotary_args`: the kernel's rotary pointers, strides and head counts, in its order)."""
    if ROTARY:
        _tc_store_rotary(out_ptr, total, pid_n, HALF, rotary_args, HEAD_DIM, BLOCK_SIZE)
    else:
        _tc_store(out_ptr, total, rows, row_mask, pid_n, n, HALF, GATED)


@triton.jit
def _tc_store_rotary(
    out_ptr, total, pid_n, HALF: tl.constexpr, rotary_args, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr
):
    """Features d and d + HEAD_DIM / 2 (d in this block's HALF) of one head of the [q | k | v] row: rounded to the
    output dtype (what the GEMV alone would write), rotated in float32 if a q or k head (what `kernels.rotary`
    computes, same rounding), stored to the output and, for k and v heads, into the cache at the token's slot
    (negative: a padding row, nothing stored)."""
    (
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
    ) = rotary_args
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
    allow_pdl: bool = True,  # False: never programmatic dependent launch (`KernelConfig.pdl`)
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
    m, n, k, block = check_call(x, packed, scales, zeros, group_size)
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
    pdl = pdl_enabled(x.device, allow_pdl)
    per_split, splits = split_blocks(k // block, blocks, split_k)
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
        num_warps=num_warps,  # pyright: ignore[reportCallIssue]  # triton launch option
        num_stages=1,  # pyright: ignore[reportCallIssue]  # triton launch option
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
