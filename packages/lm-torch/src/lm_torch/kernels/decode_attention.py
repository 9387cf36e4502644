"""Decode attention over the paged KV cache: one new token per sequence, split-K for long contexts.

One program takes one (kv head, sequence, split). The query heads that share the kv head are the rows of one tile,
so each K/V block is read once for its whole group (GQA and MQA; MHA has groups of one). A sequence's visible
context is cut into up to `num_splits` ranges of at least `split_tokens` tokens, so that a small batch still fills
the GPU (flash-decoding) while short sequences stay whole; each range leaves its normalised partial output and
log-sum-exp, and the last split program of a (sequence, kv head) to finish merges them, found by an atomic counter
per (sequence, kv head): one launch, no second merge kernel. A sequence of one range writes its output itself, and
the grid's split programs beyond a sequence's ranges return at once. With `seq_order` the programs take the
sequences in that order (the backend's longest context first).

A quantized cache (`quant_policy` 8 or 4, see `lm_torch.kv_quant`) holds value = code * scale + zero per (token, kv
head). Its tiles are never dequantized: the codes enter the dots as integers in q's dtype, and the scales and zeros
act on the small score and probability tiles (scale * q.codes + zero * sum(q); p * scale against the codes plus
sum(p * zero)). int4 tiles are the two halves of head_dim, each its own dot. The policy is a constexpr: the
unquantized kernel is compiled as before.

Everything the kernels read is a device tensor, so a captured CUDA graph replays them with new lengths and block
tables; its split count is fixed at capture. `num_splits` and `split_tokens` are run-time arguments that triton does
not specialise on, so every split count shares one compiled kernel (an engine meets many: each CUDA-graph bucket
and each eager step picks its own, and a compile costs about a second). Sequences whose query length is not 1 are
skipped: in a mixed batch the prefill kernel attends them.
"""

# Triton's type stubs describe host Python, not the @triton.jit language, so these rules are off here:
# reportArgumentType: `tl.constexpr` parameters are typed as the class `constexpr`, so the plain values passed to them
#   are rejected.
# reportOperatorIssue: `tl` reductions and loads are typed `tensor | tuple`, so arithmetic on their results is
#   rejected.
# pyright: reportArgumentType=false, reportOperatorIssue=false

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from lm_torch.kernels.common import (
    LOG2E,
    arrives_last,
    check_cuda_or_interpreter,
    cuda_device_name,
    interpreting,
    multiprocessor_count,
    next_power_of_2,
    pdl_enabled,
    pdl_trigger,
    pdl_wait,
    persistent_zeros,
    read_tuning_file,
    tanh,
)
from lm_torch.kernels.kv_cache import codes_to, load_kv_tile, quantized_cache_args, unpack_codes

if TYPE_CHECKING:
    from lm_torch.envs import DecodeSplits
    from lm_torch.kernels.tuning import TuningTables

# A split covers at least this many tokens: fewer would spend more on merging than they save.
MIN_TOKENS_PER_SPLIT = 64
MAX_SPLITS = 32
# Programs per multiprocessor the split count aims at. NOTE: four rather than two (graph buckets of 16, 32, 64
# decodes then take 5, 3, 2 splits instead of 3, 2, 1): with real steps' ragged contexts the small buckets finish
# sooner with the extra splits (`benchmarks/decode_ragged.py --splits-sweep`).
SPLIT_WAVES = 4
SPLIT_COUNTERS = "decode_attention split counters"  # the `persistent_zeros` buffer's name

# Launch plans measured per decode count (`benchmarks/decode_ragged.py --tune`, real serving steps' contexts): the
# file `KernelConfig.decode_tuning` names ("none": no table), else kernels/decode_tuning.json. Unquantized caches of
# the head_dim and element size the table was measured with, on its card.
DECODE_TUNING_SETTING = "KernelConfig.decode_tuning"
DEFAULT_DECODE_TUNING = str(Path(__file__).with_name("decode_tuning.json"))
# What a plan fixes: the launch shape, the split-K, and whether the programs start longest context first.
PLAN_KEYS = ("block_n", "num_warps", "num_stages", "num_splits", "split_tokens", "sort")
LAUNCH_KEYS = ("block_n", "num_warps", "num_stages")
# The launch shape without a table (the interpreter takes 16-key tiles: smaller programs to interpret).
DEFAULT_LAUNCH = {"block_n": 64, "num_warps": 4, "num_stages": 2}


@functools.cache
def _decode_table(
    path: str, device_name: str | None, head_dim: int, kv_bytes: int, named: bool = False
) -> tuple[tuple[int, dict], ...]:
    """((decodes, plan), ...) by decodes, from the file at `path`; empty when the file does not exist or was measured
    on another card, head_dim or cache element size (its launch shapes may not even fit other tiles' shared memory).
    A file `named` by `KernelConfig.decode_tuning` must exist: a mistyped path does not quietly fall back to the
    defaults."""
    data = read_tuning_file(path, DECODE_TUNING_SETTING, named)
    if data is None:
        return ()
    if not isinstance(data.get("head_dim"), int) or not isinstance(data.get("kv_bytes"), int):
        raise ValueError(f"{path}: a decode tuning table names the head_dim and kv_bytes it was measured with")
    if data.get("device") not in (None, device_name) or (data["head_dim"], data["kv_bytes"]) != (head_dim, kv_bytes):
        return ()
    table = []
    for key, plan in data["configs"].items():
        if not key.isdigit() or int(key) < 1:
            raise ValueError(f"{path}: decode tuning keys are decode counts (positive integers), got {key!r}")
        if not isinstance(plan, dict) or sorted(plan) != sorted(PLAN_KEYS):
            raise ValueError(f"{path}: the plan of {key!r} must give exactly {', '.join(PLAN_KEYS)}")
        if not 1 <= plan["num_splits"] <= MAX_SPLITS or plan["split_tokens"] < 1:
            raise ValueError(
                f"{path}: the plan of {key!r} has num_splits outside [1, {MAX_SPLITS}] or split_tokens < 1"
            )
        table.append((int(key), plan))
    return tuple(sorted(table, key=lambda entry: entry[0]))


def tuned_decode_plan(num_decodes: int, k_cache: torch.Tensor, tuning: TuningTables | None = None) -> dict | None:
    """The tuning table's plan (`PLAN_KEYS`) for the fewest decodes measured at or above `num_decodes` with this
    cache (`[blocks, block_size, kv_heads, head_dim]`: its card, head_dim and element size must be the table's; a
    CUDA-graph bucket finds its own row), or None: no such table, a quantized cache, or a larger batch than any row.
    `tuning`: the engine's tables (None: the tables shipped beside the kernels)."""
    from lm_torch.kernels.tuning import shipped_tables

    tables = tuning if tuning is not None else shipped_tables(cuda_device_name(k_cache.device))
    return tables.decode_plan(num_decodes, k_cache)


@triton.jit
def _codes_operand(codes, dtype: tl.constexpr, PART: tl.constexpr):
    """A tile of cache codes (uint8) as a dot operand of `dtype`, exactly: PART 0 the bytes (int8), 1 their low and
    2 their high nibbles (int4). For bf16 and fp16 in inline PTX, four codes at a time (byte permutes into magic
    floats, one subtraction); the asm is marked impure so that triton keeps the conversion where it is, in the
    load's coalesced layout, and the tile goes to shared memory as 16-bit values: left as arithmetic, triton moves
    it after a shared-memory round trip of the bytes into the dot's operand layout, which for the V operand (tokens
    along the reduction) reads the bytes one at a time. Other dtypes (float32) convert plainly."""
    if dtype == tl.bfloat16:
        if PART == 0:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 a0, a1, a2, a3;\n"
                "prmt.b32 a0, $2, 0x4B000000, 0x7540; prmt.b32 a1, $2, 0x4B000000, 0x7541;\n"
                "prmt.b32 a2, $2, 0x4B000000, 0x7542; prmt.b32 a3, $2, 0x4B000000, 0x7543;\n"
                "sub.f32 a0, a0, 0f4B000000; sub.f32 a1, a1, 0f4B000000;\n"
                "sub.f32 a2, a2, 0f4B000000; sub.f32 a3, a3, 0f4B000000;\n"
                "prmt.b32 $0, a0, a1, 0x7632; prmt.b32 $1, a2, a3, 0x7632; }",
                "=r,=r,r",
                [codes],
                dtype=tl.bfloat16,
                is_pure=False,
                pack=4,
            )
        else:
            # A nibble is at most 15: the bf16 of bits 0x4300 | c is 128 + c, exact; two codes per permute.
            if PART == 1:  # noqa: SIM108 - a compile-time branch
                nibbles = codes & 15
            else:
                nibbles = codes >> 4
            return tl.inline_asm_elementwise(
                "{ .reg .b32 m; mov.b32 m, 0x43004300;\n"
                "prmt.b32 $0, $2, 0x43434343, 0x4140; prmt.b32 $1, $2, 0x43434343, 0x4342;\n"
                "sub.bf16x2 $0, $0, m; sub.bf16x2 $1, $1, m; }",
                "=r,=r,r",
                [nibbles],
                dtype=tl.bfloat16,
                is_pure=False,
                pack=4,
            )
    elif dtype == tl.float16:
        # The fp16 of bits 0x6400 | c is 1024 + c, exact for every byte; two codes per permute.
        if PART == 1:
            codes = codes & 15
        elif PART == 2:
            codes = codes >> 4
        return tl.inline_asm_elementwise(
            "{ .reg .b32 m; mov.b32 m, 0x64006400;\n"
            "prmt.b32 $0, $2, 0x64646464, 0x4140; prmt.b32 $1, $2, 0x64646464, 0x4342;\n"
            "sub.f16x2 $0, $0, m; sub.f16x2 $1, $1, m; }",
            "=r,=r,r",
            [codes],
            dtype=tl.float16,
            is_pure=False,
            pack=4,
        )
    else:
        if PART == 1:
            codes = codes & 15
        elif PART == 2:
            codes = codes >> 4
        return codes.to(dtype)


@triton.jit(do_not_specialize=["num_splits", "split_tokens"])
def _decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    query_start_ptr,
    context_lens_ptr,
    out_ptr,
    partial_out_ptr,  # [num_seqs, num_heads, num_splits, HEAD_DIM] float32 (unused with one split)
    partial_lse_ptr,  # [num_seqs, num_heads, num_splits] float32, log2 domain
    counters_ptr,  # [>= num_seqs * num_kv_heads] int32, zero on entry and on exit (`persistent_zeros`)
    order_ptr,  # [num_seqs] int32: a permutation of the sequences (SORTED)
    qk_scale,  # scale * log2(e), or scale alone with soft-capping
    softcap,
    window,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_table,
    stride_ot,
    stride_oh,
    num_heads,
    num_splits,
    split_tokens,  # the fewest tokens a split of a sequence covers (its split count follows from its length)
    k_sz_ptr,  # quantized caches: [num_blocks, block_size, num_kv_heads, 2] (scale, zero); unused otherwise
    v_sz_ptr,
    stride_szb,
    stride_szs,
    stride_szh,
    GROUP: tl.constexpr,  # query heads per kv head
    ROWS: tl.constexpr,  # GROUP padded to a power of two >= 16 (the smallest tile a dot takes)
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_N: tl.constexpr,  # keys per loop step
    USE_SOFTCAP: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (exact products, not tf32), else "tf32" (unused)
    QUANT_POLICY: tl.constexpr,  # 0: the cache holds q's dtype; 8: int8 codes; 4: int4 codes, two per byte
    FEAT: tl.constexpr,  # features per loaded tile: HEAD_DIM, or HEAD_DIM / 2 with int4 (one tile per half)
    FEAT_PAD: tl.constexpr,
    DIM_PAD: tl.constexpr,  # HEAD_DIM padded to a power of two (the merge's tile)
    SPLITS_PAD: tl.constexpr,  # splits the merge reads: 16, or 32 above 16 (two compiled kernels at most)
    GROUP_PAD: tl.constexpr,  # GROUP padded to a power of two (the merge's heads)
    PDL: tl.constexpr,  # launched with programmatic dependent launch, and lets o_proj's GEMV start loading early
    SORTED: tl.constexpr,  # `order_ptr` [num_seqs] gives the sequences in the order their programs start
    CONVERT: tl.constexpr,  # quantized caches: 0 codes_to for K and V, 1 `_codes_operand` for V, 2 for K and V
):
    # The GPU starts programs in the order of the grid's first axis, then the second: every kv head of one sequence,
    # then the next sequence, longest context first where `order_ptr` sorts them (the long ones do not start last).
    kv_head = tl.program_id(0)
    split = tl.program_id(2)
    pdl_trigger(PDL)
    pdl_wait(PDL)
    seq = tl.program_id(1)
    if SORTED:
        seq = tl.load(order_ptr + seq)
    row = tl.load(query_start_ptr + seq)
    ctx = tl.load(context_lens_ptr + seq)
    start = 0
    if USE_WINDOW:
        start = tl.maximum(ctx - window, 0)
    # The sequence's own split count: at most num_splits, each split at least `split_tokens` tokens and whole BLOCK_N
    # steps, so a short context in a batch of long ones is one program that writes its output itself (no partials,
    # no merge), and the grid's other splits of it return at once. At least one split, even with no keys.
    used = tl.minimum(num_splits, tl.maximum(tl.cdiv(ctx - start, split_tokens), 1))
    per_split = tl.maximum(tl.cdiv(tl.cdiv(ctx - start, used), BLOCK_N), 1) * BLOCK_N
    used = tl.maximum(tl.cdiv(ctx - start, per_split), 1)
    if (tl.load(query_start_ptr + seq + 1) - row == 1) & (split < used):
        lo = start + split * per_split
        hi = tl.minimum(lo + per_split, ctx)

        rows = tl.arange(0, ROWS)
        heads = kv_head * GROUP + rows
        # Features of one tile: all of head_dim, or for int4 the low half (the high half is a second tile, + FEAT).
        dims = tl.arange(0, FEAT_PAD)
        row_mask = (rows < GROUP)[:, None] & (dims < FEAT)[None, :]
        q_src = q_ptr + row * stride_qt + heads[:, None] * stride_qh + dims[None, :]
        q = tl.load(q_src, mask=row_mask, other=0.0)
        if QUANT_POLICY == 0:
            q = q.to(k_cache_ptr.dtype.element_ty)  # [ROWS, FEAT_PAD]
        q_hi = q
        if QUANT_POLICY == 4:
            q_hi = tl.load(q_src + FEAT, mask=row_mask, other=0.0)
        # Each key's zero adds zero * sum(q) to its score (quantized caches).
        q_sum = tl.sum(q.to(tl.float32), 1)  # [ROWS]
        if QUANT_POLICY == 4:
            q_sum += tl.sum(q_hi.to(tl.float32), 1)

        m = tl.full([ROWS], float("-inf"), tl.float32)  # running max of the scores (log2 domain)
        row_sum = tl.zeros([ROWS], tl.float32)  # running sum of exp2(score - m)
        acc = tl.zeros([ROWS, FEAT_PAD], tl.float32)
        acc_hi = tl.zeros([ROWS, FEAT_PAD], tl.float32)  # int4 only: the high half's output
        table = block_tables_ptr + seq.to(tl.int64) * stride_table
        kv_args = (table, k_cache_ptr, v_cache_ptr, k_sz_ptr, v_sz_ptr, kv_head, dims)
        kv_strides = (
            stride_kb,
            stride_ks,
            stride_kh,
            stride_vb,
            stride_vs,
            stride_vh,
            stride_szb,
            stride_szs,
            stride_szh,
        )
        for first in range(lo, hi, BLOCK_N):
            k, v, k_scale, k_zero, v_scale, v_zero, valid = load_kv_tile(
                first, hi, kv_args, kv_strides, BLOCK_SIZE, BLOCK_N, FEAT, QUANT_POLICY
            )
            if QUANT_POLICY != 0:
                # NOTE: value = code * scale + zero per (token, kv head), so the scale and zero go onto the small
                # [ROWS, BLOCK_N] scores rather than the [BLOCK_N, FEAT_PAD] tile: the codes (integers to 255, exact
                # in bf16, fp16 and float32) enter the dot as they are, and their products with q sum in float32.
                # Cheaper than dequantizing (no integer-to-float conversion, no FMA per element; about half the
                # registers for int4) and more exact (k is never rounded to q's dtype).
                if CONVERT == 2:
                    k_lo = _codes_operand(k, q.dtype, 0 if QUANT_POLICY == 8 else 1)
                    k_hi = _codes_operand(k, q.dtype, 2) if QUANT_POLICY == 4 else k_lo
                else:
                    k_lo, k_hi = unpack_codes(k, QUANT_POLICY)
                    k_lo = codes_to(k_lo, q.dtype)
                    k_hi = codes_to(k_hi, q.dtype)
                s = tl.dot(q, tl.trans(k_lo), input_precision=DOT_PRECISION)
                if QUANT_POLICY == 4:
                    s += tl.dot(q_hi, tl.trans(k_hi), input_precision=DOT_PRECISION)
                s = s * k_scale[None, :] + q_sum[:, None] * k_zero[None, :]
            else:
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [ROWS, BLOCK_N] float32
            # Soft-capping works on natural-log scores; the softmax below runs on exp2, hence log2(e) after it.
            s = softcap * tanh(s * qk_scale / softcap) * 1.4426950408889634 if USE_SOFTCAP else s * qk_scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            row_sum = row_sum * alpha + tl.sum(p, 1)
            if QUANT_POLICY != 0:
                # sum_n p[n] * (code[n] * scale[n] + zero[n]): the dot takes p * scale rounded to q's dtype (one
                # rounding, where dequantizing rounds both p and v); the zeros' share, the same for every feature,
                # stays float32.
                p_scaled = (p * v_scale[None, :]).to(q.dtype)  # [ROWS, BLOCK_N]
                p_zero = tl.sum(p * v_zero[None, :], 1)[:, None]  # [ROWS, 1]
                if CONVERT >= 1:
                    v_lo = _codes_operand(v, q.dtype, 0 if QUANT_POLICY == 8 else 1)
                    v_hi = _codes_operand(v, q.dtype, 2) if QUANT_POLICY == 4 else v_lo
                else:
                    v_lo, v_hi = unpack_codes(v, QUANT_POLICY)
                    v_lo = codes_to(v_lo, q.dtype)
                    v_hi = codes_to(v_hi, q.dtype)
                pv = tl.dot(p_scaled, v_lo, input_precision=DOT_PRECISION)  # [ROWS, FEAT_PAD]
                acc = acc * alpha[:, None] + p_zero + pv
                if QUANT_POLICY == 4:
                    pv_hi = tl.dot(p_scaled, v_hi, input_precision=DOT_PRECISION)
                    acc_hi = acc_hi * alpha[:, None] + p_zero + pv_hi
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m = m_new

        # An empty range (short context, or a padded row with no context) leaves row_sum = 0: output 0, lse -inf.
        has_keys = row_sum > 0
        out = acc / tl.where(has_keys, row_sum, 1.0)[:, None]
        out_hi = acc_hi / tl.where(has_keys, row_sum, 1.0)[:, None]
        if used == 1:
            dst = out_ptr + row * stride_ot + heads[:, None] * stride_oh + dims[None, :]
            tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=row_mask)
            if QUANT_POLICY == 4:
                tl.store(dst + FEAT, out_hi.to(out_ptr.dtype.element_ty), mask=row_mask)
        else:
            head_rows = (seq * num_heads + heads).to(tl.int64) * num_splits + split
            # (Not `dst`: a variable assigned in both branches of a run-time `if` must keep one type.)
            partial_dst = partial_out_ptr + head_rows[:, None] * HEAD_DIM + dims[None, :]
            tl.store(partial_dst, out, mask=row_mask)
            if QUANT_POLICY == 4:
                tl.store(partial_dst + FEAT, out_hi, mask=row_mask)
            lse = tl.where(has_keys, m + tl.log2(tl.where(has_keys, row_sum, 1.0)), float("-inf"))
            tl.store(partial_lse_ptr + head_rows, lse, mask=rows < GROUP)
            # The last of a (sequence, kv head)'s split programs to arrive merges all its splits.
            counter = counters_ptr + seq * tl.num_programs(0) + kv_head
            if arrives_last(counter, used):
                # Every head of the group at once, so the merge costs one round trip to L2, not one per head.
                group_heads = tl.arange(0, GROUP_PAD)
                splits = tl.arange(0, SPLITS_PAD)
                all_dims = tl.arange(0, DIM_PAD)
                bases = (seq * num_heads + kv_head * GROUP + group_heads).to(tl.int64) * num_splits  # [GP]
                lse_mask = (group_heads < GROUP)[:, None] & (splits < used)[None, :]  # [GP, SP]
                split_rows = bases[:, None] + splits[None, :]  # [GP, SP]
                split_lse = tl.load(
                    partial_lse_ptr + split_rows, mask=lse_mask, other=float("-inf"), cache_modifier=".cg"
                )
                parts = tl.load(
                    partial_out_ptr + split_rows[:, :, None] * HEAD_DIM + all_dims[None, None, :],
                    mask=lse_mask[:, :, None] & (all_dims < HEAD_DIM)[None, None, :],
                    other=0.0,
                    cache_modifier=".cg",
                )  # [GP, SP, DIM_PAD]
                top = tl.max(split_lse, 1)
                top = tl.where(top == float("-inf"), 0.0, top)  # every split empty: all weights 0, output 0
                weights = tl.exp2(split_lse - top[:, None])  # [GP, SP]
                total = tl.sum(weights, 1)
                merged = tl.sum(parts * weights[:, :, None], 1) / tl.where(total > 0, total, 1.0)[:, None]
                merged_heads = kv_head * GROUP + group_heads
                tl.store(
                    out_ptr + row * stride_ot + merged_heads[:, None] * stride_oh + all_dims[None, :],
                    merged.to(out_ptr.dtype.element_ty),
                    mask=(group_heads < GROUP)[:, None] & (all_dims < HEAD_DIM)[None, :],
                )  # [GP, DIM_PAD]
                # The next launch (next layer, next graph replay) counts from zero again; every split has arrived.
                tl.store(counter, 0)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, device: torch.device) -> int:
    """Splits per sequence so that about `SPLIT_WAVES` waves of programs fill the GPU, each covering enough tokens."""
    programs = num_seqs * num_kv_heads
    wanted = math.ceil(SPLIT_WAVES * multiprocessor_count(device) / max(programs, 1))
    by_length = max(1, max_context_len // MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, by_length, MAX_SPLITS))


# The context length a CUDA graph's split-K is chosen for (see `graph_split_plan`).
GRAPH_SPLIT_CONTEXT = 1024


def graph_split_plan(
    bucket: int,
    num_kv_heads: int,
    max_context_len: int,
    device: torch.device,
    splits_override: DecodeSplits | None = None,
    tuning: TuningTables | None = None,
    k_cache: torch.Tensor | None = None,
) -> tuple[int, int]:
    """(num_splits, split_tokens) of the decode kernel in a CUDA-graph bucket, both fixed at capture.

    Without `splits_override`, a `k_cache` the decode table was measured for takes the table's plan for the bucket
    (`tuning`, None: the shipped tables). Otherwise the kernel's heuristic for a context of `GRAPH_SPLIT_CONTEXT`
    tokens (or the longest the engine allows, if shorter), splits of at least `MIN_TOKENS_PER_SPLIT` tokens: longer
    contexts run with a few too few splits; each sequence uses only the splits its own length needs.
    `splits_override` (`KernelConfig.decode_splits`) raises the buckets below its `min_splits` to it and makes every
    split at least `min_tokens` tokens.
    """
    plan = None if splits_override is not None or k_cache is None else tuned_decode_plan(bucket, k_cache, tuning)
    if plan is not None:
        return plan["num_splits"], plan["split_tokens"]
    splits = choose_num_splits(bucket, num_kv_heads, min(max_context_len, GRAPH_SPLIT_CONTEXT), device)
    if splits_override is None:
        return splits, MIN_TOKENS_PER_SPLIT
    return min(max(splits, splits_override.min_splits), MAX_SPLITS), splits_override.min_tokens


def decode_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32/int64
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32: sequence i's tokens are rows [start[i], start[i + 1])
    context_lens: torch.Tensor,  # [num_seqs] int32: cached tokens of each sequence, its new one included
    scale: float,
    *,
    max_context_len: int,
    sliding_window: int | None = None,
    softcap: float | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    convert: int | None = None,
    seq_order: torch.Tensor | None = None,  # [num_seqs] int32, a permutation: programs start in this order
    split_tokens: int = MIN_TOKENS_PER_SPLIT,  # each sequence takes min(num_splits, ceil(context / this)) splits
    k_scales_zeros: torch.Tensor | None = None,  # quantized uint8 caches: [num_blocks, block_size, num_kv_heads, 2]
    v_scales_zeros: torch.Tensor | None = None,
    allow_pdl: bool = True,  # False: never programmatic dependent launch (`KernelConfig.pdl`)
) -> torch.Tensor:  # out: [num_tokens, num_heads, head_dim], written at the rows of one-token sequences
    """Attend each one-token sequence's query to its cached context (the last `sliding_window` tokens of it).

    `max_context_len` (a host int, at least every context length) sizes the split-K; `num_splits` overrides it (a
    CUDA graph fixes it at capture). Rows of sequences with more than one new token are left untouched. With
    `*_scales_zeros` the caches hold int8 or int4 codes (`lm_torch.kv_quant`), multiplied as integers in q's dtype
    with the scales and zeros applied to the scores and probabilities.
    """
    check_cuda_or_interpreter(q, k_cache, v_cache, block_tables, query_start_loc, context_lens)
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_seqs = context_lens.shape[0]
    num_kv_heads = k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"decode_attention: {num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    if head_dim < 16:
        raise ValueError(f"decode_attention: head_dim {head_dim} is below 16, the smallest tile a dot takes")
    policy, sz_args = quantized_cache_args(k_cache, v_cache, k_scales_zeros, v_scales_zeros, head_dim)
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("decode_attention: head_dim must match and be contiguous in q and the caches")
    feat = head_dim // 2 if policy == 4 else head_dim
    if feat < 16:
        raise ValueError(f"decode_attention: int4 caches need head_dim >= 32 (two tiles of 16), got {head_dim}")
    if query_start_loc.shape != (num_seqs + 1,) or block_tables.shape[0] != num_seqs:
        raise ValueError("decode_attention: query_start_loc, block_tables and context_lens disagree on num_seqs")
    out = torch.empty_like(q) if out is None else out
    if num_seqs == 0:
        return out
    window = sliding_window if sliding_window is not None else 0
    visible = min(max_context_len, window) if window else max_context_len
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, visible, q.device)
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"decode_attention: num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    if split_tokens < 1:
        raise ValueError(f"decode_attention: split_tokens must be at least 1, got {split_tokens}")
    if seq_order is not None and (seq_order.shape != (num_seqs,) or seq_order.dtype != torch.int32):
        raise ValueError(
            f"decode_attention: seq_order must be [{num_seqs}] int32, got {list(seq_order.shape)} {seq_order.dtype}"
        )
    group = num_heads // num_kv_heads
    block_n = block_n or (16 if interpreting() else DEFAULT_LAUNCH["block_n"])
    num_warps, num_stages = num_warps or DEFAULT_LAUNCH["num_warps"], num_stages or DEFAULT_LAUNCH["num_stages"]
    # With one split the partial buffers and counters are never touched; placeholders of the same dtypes keep the
    # kernel's signature (and so its compiled binary) the same as with several.
    partial_out = partial_lse = torch.empty(1, dtype=torch.float32, device=q.device)
    # Arrival counters of the split programs, one per (sequence, kv head): the kernel leaves them at zero.
    counters = persistent_zeros(q.device, SPLIT_COUNTERS, num_seqs * num_kv_heads if num_splits > 1 else 1)
    if num_splits > 1:
        partial_out = torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        partial_lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device)
    pdl = pdl_enabled(q.device, allow_pdl)
    _decode_kernel[(num_kv_heads, num_seqs, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        query_start_loc,
        context_lens,
        out,
        partial_out,
        partial_lse,
        counters,
        seq_order if seq_order is not None else counters,
        scale if softcap else scale * LOG2E,
        softcap or 1.0,
        window,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        num_heads,
        num_splits,
        split_tokens,
        *sz_args,
        GROUP=group,
        ROWS=max(16, next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_N=block_n,
        USE_SOFTCAP=bool(softcap),
        USE_WINDOW=bool(window),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        QUANT_POLICY=policy,
        FEAT=feat,
        FEAT_PAD=next_power_of_2(feat),
        DIM_PAD=next_power_of_2(head_dim),
        SPLITS_PAD=16 if num_splits <= 16 else next_power_of_2(MAX_SPLITS),
        GROUP_PAD=next_power_of_2(group),
        PDL=pdl,
        SORTED=seq_order is not None,
        # The interpreter runs no PTX: it converts plainly whatever `convert` says.
        CONVERT=0 if interpreting() else 1 if convert is None else convert,
        num_warps=num_warps,  # pyright: ignore[reportCallIssue]  # triton launch option
        num_stages=num_stages,  # pyright: ignore[reportCallIssue]  # triton launch option
        **({"launch_pdl": True} if pdl else {}),
    )
    return out
