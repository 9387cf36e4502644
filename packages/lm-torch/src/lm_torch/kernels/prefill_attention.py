"""Prefill attention over the paged KV cache: chunks of new tokens attend to a cached prefix and to themselves.

A sequence's new tokens are the last `query_len` of its `context_len` positions (the earlier ones are a cached
prefix or earlier chunks, already in the cache, as are the new tokens' own K/V). Its new tokens are cut into tiles
of `tokens_per_tile`; one program takes one (tile, kv head) and stacks the tile's tokens times the group's query
heads into the rows of one matrix, so each K/V block it reads serves the whole group (GQA/MQA). The causal mask,
the sliding window and soft-capping are applied per row; keys outside every row's window are never loaded.

Optional per-token key limits (`key_limits`, a constexpr switch: without them the kernel is the causal one) widen
the causal mask: new token t sees key positions below `key_limits[t]` (never below its own position + 1, never past
its sequence's context), still cut by the sliding window from below. Gemma 3 gives an image's placeholder tokens the
span's end, so they attend each other bidirectionally.

A quantized cache (`quant_policy` 8 or 4, see `lm_torch.kv_quant`) is dequantized tile by tile right after loading,
int4 as two half-width tiles with a dot each; the policy is a constexpr, so the unquantized kernel is unchanged.

The tile list (which sequence and which first token each program takes) is built on the host from the query lengths
the scheduler already knows, once per step (`prefill_tiles`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lm_torch.kernels.common import LOG2E, check_cuda_or_interpreter, interpreting, next_power_of_2, tanh
from lm_torch.kernels.kv_cache import dequantize_tile, load_kv_tile, quantized_cache_args


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    query_start_ptr,
    context_lens_ptr,
    tile_seq_ptr,  # [num_tiles] the sequence of each tile
    tile_first_ptr,  # [num_tiles] the tile's first token, counted within its sequence's new tokens
    key_limits_ptr,  # [num_tokens] int32 with USE_KEY_LIMITS: keys below key_limits[t] visible to token t
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
    k_sz_ptr,  # quantized caches: [num_blocks, block_size, num_kv_heads, 2] (scale, zero); unused otherwise
    v_sz_ptr,
    stride_szb,
    stride_szs,
    stride_szh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    TOKENS: tl.constexpr,  # query tokens per tile; rows = TOKENS * GROUP_PAD
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_KEY_LIMITS: tl.constexpr,  # False: causal (a key is visible up to the query's own position)
    DOT_PRECISION: tl.constexpr,
    QUANT_POLICY: tl.constexpr,  # 0: the cache holds q's dtype; 8: int8 codes; 4: int4 codes, two per byte
    FEAT: tl.constexpr,  # features per loaded tile: head_dim, or head_dim / 2 with int4 (one tile per half)
    FEAT_PAD: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(tile_seq_ptr + tile)
    first_token = tl.load(tile_first_ptr + tile)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    ctx = tl.load(context_lens_ptr + seq)

    # Row r is query head kv_head * GROUP + r % GROUP_PAD of the tile's token r // GROUP_PAD.
    rows = tl.arange(0, TOKENS * GROUP_PAD)
    tokens = first_token + rows // GROUP_PAD
    group_heads = rows % GROUP_PAD
    row_valid = (tokens < q_len) & (group_heads < GROUP)
    query_pos = ctx - q_len + tokens  # [ROWS] position of each row's token in its sequence
    # Features of one tile: all of head_dim, or for int4 the low half (the high half is a second tile, + FEAT).
    dims = tl.arange(0, FEAT_PAD)
    q_mask = row_valid[:, None] & (dims < FEAT)[None, :]
    q_rows = (q_start + tokens) * stride_qt + (kv_head * GROUP + group_heads) * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + dims[None, :], mask=q_mask, other=0.0)
    if QUANT_POLICY == 0:
        q = q.to(k_cache_ptr.dtype.element_ty)
    q_hi = q
    if QUANT_POLICY == 4:
        q_hi = tl.load(q_ptr + q_rows[:, None] + FEAT + dims[None, :], mask=q_mask, other=0.0)

    last_token = tl.minimum(first_token + TOKENS, q_len) - 1
    last_pos = ctx - q_len + last_token
    hi = last_pos + 1  # keys past the tile's last query are masked for every row
    if USE_KEY_LIMITS:
        limit = tl.load(key_limits_ptr + q_start + tokens, mask=row_valid, other=0)  # [ROWS] exclusive key bounds
        hi = tl.maximum(hi, tl.max(limit, 0))  # the largest limit (each is at least its row's position + 1)
    # Keys before this are visible to every row (their limits are at least their position + 1).
    diagonal = ctx - q_len + first_token + 1
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(ctx - q_len + first_token - window + 1, 0)

    m = tl.full([TOKENS * GROUP_PAD], float("-inf"), tl.float32)
    row_sum = tl.zeros([TOKENS * GROUP_PAD], tl.float32)
    acc = tl.zeros([TOKENS * GROUP_PAD, FEAT_PAD], tl.float32)
    acc_hi = tl.zeros([TOKENS * GROUP_PAD, FEAT_PAD], tl.float32)  # int4 only: the high half's output
    table = block_tables_ptr + seq.to(tl.int64) * stride_table
    kv_args = (table, k_cache_ptr, v_cache_ptr, k_sz_ptr, v_sz_ptr, kv_head, dims)
    kv_strides = (stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_szb, stride_szs, stride_szh)
    for first in range(lo, hi, BLOCK_N):
        positions = first + tl.arange(0, BLOCK_N)
        k, v, k_scale, k_zero, v_scale, v_zero, valid = load_kv_tile(
            first, hi, kv_args, kv_strides, BLOCK_SIZE, BLOCK_N, FEAT, QUANT_POLICY
        )
        if QUANT_POLICY != 0:
            k, k_hi = dequantize_tile(k, k_scale, k_zero, QUANT_POLICY)
            v, v_hi = dequantize_tile(v, v_scale, v_zero, QUANT_POLICY)
            k, k_hi, v, v_hi = k.to(q.dtype), k_hi.to(q.dtype), v.to(q.dtype), v_hi.to(q.dtype)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            if QUANT_POLICY == 4:
                s += tl.dot(q_hi, tl.trans(k_hi), input_precision=DOT_PRECISION)
        else:
            v_hi = v
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [ROWS, BLOCK_N] float32
        # Soft-capping works on natural-log scores; the softmax below runs on exp2, hence log2(e) after it.
        s = softcap * tanh(s * qk_scale / softcap) * 1.4426950408889634 if USE_SOFTCAP else s * qk_scale
        # Steps wholly before the tile's first query (and inside every row's window) need no mask.
        needs_mask = first + BLOCK_N > diagonal
        if USE_WINDOW:
            needs_mask = needs_mask | (first <= last_pos - window)
        if needs_mask:
            if USE_KEY_LIMITS:
                visible = valid[None, :] & (positions[None, :] < limit[:, None])
            else:
                visible = valid[None, :] & (positions[None, :] <= query_pos[:, None])
            if USE_WINDOW:
                visible = visible & (positions[None, :] > query_pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
        # A row may see nothing in this step (its window starts later, or it is padding): keep its max at -inf
        # and shift by 0 instead, so that exp2 gives 0 rather than NaN.
        m_new = tl.maximum(m, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - shift)
        p = tl.exp2(s - shift[:, None])
        row_sum = row_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        if QUANT_POLICY == 4:
            acc_hi = acc_hi * alpha[:, None] + tl.dot(p.to(v_hi.dtype), v_hi, input_precision=DOT_PRECISION)
        m = m_new

    out = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
    out_rows = (q_start + tokens) * stride_ot + (kv_head * GROUP + group_heads) * stride_oh
    tl.store(out_ptr + out_rows[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=q_mask)
    if QUANT_POLICY == 4:
        out_hi = acc_hi / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
        dst = out_ptr + out_rows[:, None] + FEAT + dims[None, :]
        tl.store(dst, out_hi.to(out_ptr.dtype.element_ty), mask=q_mask)


def tokens_per_tile(group: int, head_dim: int = 128, rows: int | None = None) -> int:
    """Query tokens per program for `group` query heads per kv head: `rows` rows in all (at least one token).

    128 rows by default (64 for head_dim above 128, whose accumulator would not fit the registers); tuned on an H100
    with `benchmarks/kernel_times.py --tune`.
    """
    if rows is None:
        rows = 32 if interpreting() else (128 if head_dim <= 128 else 64)
    return max(1, rows // next_power_of_2(group))


def prefill_tiles(
    query_lens: list[int], tokens_per_tile: int, device, skip_single: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tile_seq, tile_first): [num_tiles] int32 each, the programs covering every sequence's new tokens.

    With `skip_single`, one-token sequences get no tile (the decode kernel attends them).
    """
    seqs: list[int] = []
    firsts: list[int] = []
    for i, n in enumerate(query_lens):
        if n == 1 and skip_single:
            continue
        for first in range(0, n, tokens_per_tile):
            seqs.append(i)
            firsts.append(first)
    pairs = torch.tensor([seqs, firsts], dtype=torch.int32).to(device)
    return pairs[0], pairs[1]


def _default_block_n(head_dim: int, element_size: int) -> int:
    """Keys per step when the caller names none: 128 up to head_dim 128 in half precision (the H100's fastest),
    halved for float32, whose pipelined key and value tiles (2 x 2 x 128 x 128 x 4 bytes at head_dim 128) would
    pass the 227 KiB of shared memory a block may use; 32 beyond head_dim 128; 16 under the interpreter."""
    if interpreting():
        return 16
    if head_dim > 128:
        return 32
    return 64 if element_size >= 4 else 128


def prefill_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], already holding the new tokens
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32/int64
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    context_lens: torch.Tensor,  # [num_seqs] int32, the new tokens included
    tile_seq: torch.Tensor,  # from `prefill_tiles`
    tile_first: torch.Tensor,
    scale: float,
    *,
    tokens_per_tile: int,
    sliding_window: int | None = None,
    softcap: float | None = None,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    k_scales_zeros: torch.Tensor | None = None,  # quantized uint8 caches: [num_blocks, block_size, num_kv_heads, 2]
    v_scales_zeros: torch.Tensor | None = None,
    key_limits: torch.Tensor | None = None,  # [num_tokens] int32: keys below key_limits[t] visible (None: causal)
) -> torch.Tensor:  # out: [num_tokens, num_heads, head_dim], written at the rows the tiles cover
    """Causal attention of the tiled sequences' new tokens over their whole cached context (int8 or int4 codes,
    dequantized tile by tile, when `*_scales_zeros` are given; see `lm_torch.kv_quant`); with `key_limits`, token t
    sees the keys below `key_limits[t]` instead of those up to its own position (see the module docstring).

    `block_n` (keys per step), `num_warps` and `num_stages` override the launch shape; the defaults were the
    fastest of those `benchmarks/kernel_times.py --tune` tried for head_dim 128 on an H100 (half precision; float32
    takes half the keys per step, see `_default_block_n`).
    """
    check_cuda_or_interpreter(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, tile_seq)
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"prefill_attention: {num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    policy, sz_args = quantized_cache_args(k_cache, v_cache, k_scales_zeros, v_scales_zeros, head_dim)
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("prefill_attention: head_dim must match and be contiguous in q and the caches")
    feat = head_dim // 2 if policy == 4 else head_dim
    if feat < 16:
        raise ValueError(f"prefill_attention: int4 caches need head_dim >= 32 (two tiles of 16), got {head_dim}")
    if tile_seq.shape != tile_first.shape:
        raise ValueError("prefill_attention: tile_seq and tile_first differ in length")
    out = torch.empty_like(q) if out is None else out
    num_tiles = tile_seq.shape[0]
    if num_tiles == 0:
        return out
    group = num_heads // num_kv_heads
    if tokens_per_tile * next_power_of_2(group) < 16 or head_dim < 16:
        raise ValueError("prefill_attention: tiles need at least 16 rows (tokens x padded group) and head_dim >= 16")
    window = sliding_window if sliding_window is not None else 0
    if key_limits is not None:
        check_cuda_or_interpreter(key_limits)
        if key_limits.dim() != 1:
            raise ValueError("prefill_attention: key_limits must be [num_tokens], one limit per new token")
    _prefill_kernel[(num_tiles, num_kv_heads)](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        query_start_loc,
        context_lens,
        tile_seq,
        tile_first,
        key_limits if key_limits is not None else context_lens,  # a placeholder the kernel never reads
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
        *sz_args,
        GROUP=group,
        GROUP_PAD=next_power_of_2(group),
        TOKENS=tokens_per_tile,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_N=block_n or _default_block_n(head_dim, q.element_size()),
        USE_SOFTCAP=bool(softcap),
        USE_WINDOW=bool(window),
        USE_KEY_LIMITS=key_limits is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        QUANT_POLICY=policy,
        FEAT=feat,
        FEAT_PAD=next_power_of_2(feat),
        num_warps=num_warps or 8,  # pyright: ignore[reportCallIssue]  # triton launch option
        num_stages=num_stages or (3 if head_dim <= 128 else 2),  # pyright: ignore[reportCallIssue]  # triton launch option
    )
    return out
