"""Fused mixture-of-experts: each token's top-k experts' gated MLPs, weighted by the router and summed.

For hidden [M, H], w13 [E, 2I, H] (each expert's gate rows, then its up rows), w2 [E, H, I] and a routing of
topk_ids / topk_weights [M, k]:

    out[m] = sum_j topk_weights[m, j] * w2[e] @ (act(w13[e, :I] @ hidden[m]) * (w13[e, I:] @ hidden[m])),
    e = topk_ids[m, j].

Four steps, each a Triton launch or two:
1. `moe_align_block_size`: the M*k (token, slot) pairs, numbered flat (m * k + j), sorted by expert, stable (flat
   order within an expert), each expert's run padded to a multiple of BLOCK_M with the value M*k. Every block of
   BLOCK_M sorted entries belongs to one expert (`expert_ids`); experts with no token get no block, so they cost
   nothing after the sort. Slots past `num_tokens_post_padded` hold M*k too and their blocks expert -1. Small
   problems run one program (`_align_single_kernel`), larger ones a count pass and a place pass, one program per
   expert (`_align_count_kernel`, `_align_place_kernel`). No host synchronisation: the output sizes depend on M,
   k, E and BLOCK_M only (`sorted_capacity`).
2. The first grouped GEMM (`_moe_gemm_kernel`, GATED): a program takes one block of sorted entries and a tile of I,
   gathers the block's rows of hidden, multiplies them by both the gate and the up tile of its expert's w13 and
   writes act(gate) * up to row m * k + j of the intermediate [M*k, I].
3. The second grouped GEMM (the same kernel, ROUTED): the intermediate's rows of a block times its expert's w2,
   times the routing weight, to row m * k + j of [M*k, H] (k = 1: straight into the output [M, H]).
4. `_moe_sum_kernel`: out[m] = the sum over j of those k rows (no atomics: the same bits every run).

Numerics: products accumulate in float32 (exact float32 products for float32 inputs, never tf32); act(gate) * up
is computed in float32 and rounded once to hidden's dtype (the intermediate); each weighted expert output is
rounded to hidden's dtype, and the k of them are summed in float32 and rounded once. `kernels.reference.fused_moe`
(`fused_moe_reference`) rounds at the same points.

Launch configuration (`launch_config`): the caller's `config`, else the tuned table's entry for (E, I, H, dtype) on
this card (`load_fused_moe_table`: a JSON beside this module, `fused_moe_tuning.json`, read once; without it every
shape gets the defaults), else `default_config` by the average number of tokens per expert. A config is a dict of
`CONFIG_KEYS` (block_m, block_n, block_k, group_m, num_warps, num_stages), used by both GEMMs, with an optional
"w2" dict overriding any of these but block_m (the sort is shared) for the second one.

CUDA graphs: nothing synchronises with the host and every launch's grid depends only on the shapes, so a call can
be captured. `MoEBuffers.allocate(max_tokens, top_k, num_experts, device)` preallocates the sort's outputs for up
to max_tokens rows; passing it as `fused_moe(..., buffers=...)` writes the sort into views of those tensors, so
every captured batch size shares them (allocate once, before capture, and pass the same object to every layer and
every graph). The intermediate activations are allocated per call (from the graph's pool during capture).

Prefill batches of more than `CHUNK_TOKENS` rows run in chunks of that many rows, bounding the [rows * k, H]
workspace.
"""

# Triton's type stubs describe host Python, not the @triton.jit language, so these rules are off here:
# reportArgumentType: `tl.constexpr` parameters are typed as the class `constexpr`, so the plain values passed to them
#   are rejected.
# reportGeneralTypeIssues: `tl.range` / `tl.static_range` are typed as not iterable.
# reportOperatorIssue: `tl` reductions and loads are typed `tensor | tuple`, so arithmetic on their results is
#   rejected.
# pyright: reportArgumentType=false, reportGeneralTypeIssues=false, reportOperatorIssue=false

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

from lm_torch.kernels.activation import ACTIVATION_CODES, activate
from lm_torch.kernels.common import check_cuda_or_interpreter, cuda_device_name, interpreting, read_tuning_file
from lm_torch.kernels.reference import fused_moe as fused_moe_reference

__all__ = [
    "CHUNK_TOKENS",
    "CONFIG_KEYS",
    "MOE_ACTIVATIONS",
    "MoEBuffers",
    "default_config",
    "fused_moe",
    "fused_moe_reference",
    "launch_config",
    "load_fused_moe_table",
    "moe_align_block_size",
    "sorted_capacity",
]

# Gate activations by name -> the ACT code of `activation.activate` (HF's names, and "gelu_tanh").
MOE_ACTIVATIONS = {**ACTIVATION_CODES, "gelu_tanh": ACTIVATION_CODES["gelu_pytorch_tanh"]}
CONFIG_KEYS = ("block_m", "block_n", "block_k", "group_m", "num_warps", "num_stages")
CHUNK_TOKENS = 16384  # rows per chunk of a larger batch
# The single-program sort holds an [ids, experts] tile (both rounded up to powers of two) of at most this many on
# the GPU; the interpreter, whose cost is per program and per operation rather than per element, takes it up to the
# larger bound (both sorts write the same values).
SINGLE_PROGRAM_ELEMENTS = 8192
SINGLE_PROGRAM_ELEMENTS_INTERPRETED = 1 << 20
MAX_BLOCK_M = 128  # the largest block_m of `default_config` (`MoEBuffers.allocate`'s default)


# ---------------------------------------------------------------------------------------------------------------------
# The token-to-expert sort.


@triton.jit
def _align_single_kernel(
    ids_ptr,  # [num_ids] int32 / int64: the flat topk_ids
    sorted_ptr,  # [capacity] int32, out
    expert_ids_ptr,  # [num_blocks] int32, out
    post_padded_ptr,  # [1] int32, out
    num_ids,
    num_experts,
    capacity,
    num_blocks,
    BLOCK_M: tl.constexpr,
    IDS: tl.constexpr,  # power of two >= num_ids (and >= num_blocks)
    EXPERTS: tl.constexpr,  # power of two >= num_experts
    FILL: tl.constexpr,
):
    i = tl.arange(0, IDS)
    present = i < num_ids
    ids = tl.load(ids_ptr + i, mask=present, other=-1).to(tl.int32)
    e = tl.arange(0, EXPERTS)
    onehot = ((ids[:, None] == e[None, :]) & (e[None, :] < num_experts)).to(tl.int32)  # [IDS, EXPERTS]
    counts = tl.sum(onehot, 0)  # [EXPERTS]
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)  # [EXPERTS]: one past each expert's last slot
    total = tl.sum(padded, 0)
    rank = tl.sum(tl.cumsum(onehot, 0) * onehot, 1) - 1  # [IDS]: earlier ids of the same expert
    first_slot = tl.sum(onehot * (ends - padded)[None, :], 1)  # [IDS]: the expert's first slot
    # Every slot gets the padding value, then the real entries overwrite theirs (the barrier orders the two).
    for start in range(0, capacity, FILL):
        slots = start + tl.arange(0, FILL)
        tl.store(sorted_ptr + slots, tl.zeros([FILL], tl.int32) + num_ids, mask=slots < capacity)
    tl.debug_barrier()
    tl.store(sorted_ptr + first_slot + rank, i, mask=present)
    # Block b belongs to the first expert whose run ends past b * BLOCK_M: the number of runs ending at or before.
    b = tl.arange(0, IDS)
    owner = tl.sum((ends[None, :] <= (b * BLOCK_M)[:, None]).to(tl.int32), 1)  # [IDS]
    tl.store(expert_ids_ptr + b, tl.where(b * BLOCK_M < total, owner, -1), mask=b < num_blocks)
    tl.store(post_padded_ptr, total)


@triton.jit
def _align_count_kernel(ids_ptr, counts_ptr, num_ids, BLOCK: tl.constexpr):
    # One program per expert: how many ids name it.
    expert = tl.program_id(0)
    hits = tl.zeros([BLOCK], tl.int32)
    for start in range(0, num_ids, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offs, mask=offs < num_ids, other=-1).to(tl.int32)
        hits += (ids == expert).to(tl.int32)
    tl.store(counts_ptr + expert, tl.sum(hits, 0))


@triton.jit
def _align_place_kernel(
    ids_ptr,  # [num_ids] int32 / int64
    counts_ptr,  # [num_experts] int32, from `_align_count_kernel`
    sorted_ptr,  # [capacity] int32, out
    expert_ids_ptr,  # [num_blocks] int32, out
    post_padded_ptr,  # [1] int32, out
    num_ids,
    num_experts,
    capacity,
    num_blocks,
    BLOCK_M: tl.constexpr,
    EXPERTS: tl.constexpr,  # power of two >= num_experts
    BLOCK: tl.constexpr,
):
    # One program per expert: its ids in flat order, its padding, its blocks, and a share of the unused tail.
    expert = tl.program_id(0)
    e = tl.arange(0, EXPERTS)
    counts = tl.load(counts_ptr + e, mask=e < num_experts, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    total = tl.sum(padded, 0)
    first = tl.sum(tl.where(e < expert, padded, 0), 0)
    count = tl.sum(tl.where(e == expert, counts, 0), 0)
    run = tl.sum(tl.where(e == expert, padded, 0), 0)
    placed = first
    for start in range(0, num_ids, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offs, mask=offs < num_ids, other=-1).to(tl.int32)
        hit = ids == expert
        slots = placed + tl.cumsum(hit.to(tl.int32), 0) - 1
        tl.store(sorted_ptr + slots, offs, mask=hit)
        placed += tl.sum(hit.to(tl.int32), 0)
    pad = tl.arange(0, BLOCK_M)
    tl.store(sorted_ptr + first + count + pad, tl.zeros([BLOCK_M], tl.int32) + num_ids, mask=pad < run - count)
    for start in range(first // BLOCK_M, (first + run) // BLOCK_M, BLOCK):
        blocks = start + tl.arange(0, BLOCK)
        tl.store(expert_ids_ptr + blocks, tl.zeros([BLOCK], tl.int32) + expert, mask=blocks < (first + run) // BLOCK_M)
    stride = num_experts * BLOCK
    for start in range(total + expert * BLOCK, capacity, stride):
        slots = start + tl.arange(0, BLOCK)
        tl.store(sorted_ptr + slots, tl.zeros([BLOCK], tl.int32) + num_ids, mask=slots < capacity)
    for start in range(total // BLOCK_M + expert * BLOCK, num_blocks, stride):
        blocks = start + tl.arange(0, BLOCK)
        tl.store(expert_ids_ptr + blocks, tl.full([BLOCK], -1, tl.int32), mask=blocks < num_blocks)
    if expert == 0:
        tl.store(post_padded_ptr, total)


def sorted_capacity(num_ids: int, num_experts: int, block_m: int) -> int:
    """Slots of the sorted ids for `num_ids` = M * k entries: each expert's run rounds up to a multiple of block_m,
    so at most num_ids + E * (block_m - 1) slots, and at most num_ids * block_m (each block holds a real entry)."""
    return min(num_ids * block_m, num_ids + num_experts * (block_m - 1))


@dataclass(frozen=True)
class MoEBuffers:
    """The sort's outputs, preallocated for up to `max_tokens` rows, so that a CUDA graph can capture `fused_moe`.

    One object serves every layer with these (top_k, num_experts) and every captured batch size up to max_tokens:
    a call writes its sort into the first `sorted_capacity(M * k, E, block_m)` slots, `... // block_m` blocks.
    """

    max_tokens: int
    top_k: int
    num_experts: int
    max_block_m: int
    sorted_token_ids: torch.Tensor  # [sorted_capacity(max_tokens * top_k, E, max_block_m)] int32
    expert_ids: torch.Tensor  # [max_tokens * top_k] int32 (a block holds at least one real entry)
    num_tokens_post_padded: torch.Tensor  # [1] int32
    counts: torch.Tensor  # [E] int32: the two-pass sort's tokens per expert

    @classmethod
    def allocate(
        cls, max_tokens: int, top_k: int, num_experts: int, device: torch.device, max_block_m: int = MAX_BLOCK_M
    ) -> MoEBuffers:
        """Buffers for calls of up to `max_tokens` rows with launch configs of block_m <= `max_block_m`."""
        if max_tokens < 1 or top_k < 1 or num_experts < 1 or max_block_m < 1:
            raise ValueError(f"MoEBuffers: sizes must be positive ({max_tokens=}, {top_k=}, {num_experts=})")
        num_ids = max_tokens * top_k
        capacity = sorted_capacity(num_ids, num_experts, max_block_m)
        return cls(
            max_tokens=max_tokens,
            top_k=top_k,
            num_experts=num_experts,
            max_block_m=max_block_m,
            sorted_token_ids=torch.empty(capacity, dtype=torch.int32, device=device),
            expert_ids=torch.empty(num_ids, dtype=torch.int32, device=device),
            num_tokens_post_padded=torch.empty(1, dtype=torch.int32, device=device),
            counts=torch.empty(num_experts, dtype=torch.int32, device=device),
        )

    def views(self, num_tokens: int, top_k: int, num_experts: int, block_m: int):
        """(sorted ids, expert ids, tokens post padded, counts) for a call of `num_tokens` rows; a ValueError when
        the call does not fit these buffers."""
        if top_k != self.top_k or num_experts != self.num_experts:
            raise ValueError(
                f"MoEBuffers: allocated for top_k={self.top_k}, {self.num_experts} experts; the call has "
                f"top_k={top_k}, {num_experts} experts"
            )
        if num_tokens > self.max_tokens or block_m > self.max_block_m:
            raise ValueError(
                f"MoEBuffers: allocated for {self.max_tokens} rows and block_m <= {self.max_block_m}; the call has "
                f"{num_tokens} rows and block_m {block_m}"
            )
        capacity = sorted_capacity(num_tokens * top_k, num_experts, block_m)
        return (
            self.sorted_token_ids[:capacity],
            self.expert_ids[: capacity // block_m],
            self.num_tokens_post_padded,
            self.counts,
        )


def moe_align_block_size(
    topk_ids: torch.Tensor,  # [M, k] int32 / int64, every id in [0, num_experts)
    num_experts: int,
    block_m: int,
    *,
    buffers: MoEBuffers | None = None,
    single_program: bool | None = None,  # force (True) or forbid (False) the one-program sort; None: by size
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted_token_ids [sorted_capacity] int32, expert_ids [sorted_capacity // block_m] int32,
    num_tokens_post_padded [1] int32): the flat (m * k + j) entries sorted by expert, stable, each expert's run
    padded to a multiple of block_m with M * k; unused slots M * k, unused blocks expert -1."""
    check_cuda_or_interpreter(topk_ids)
    if topk_ids.dim() != 2 or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"moe_align_block_size: topk_ids must be [M, k] int32/int64, got {topk_ids.dtype}")
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"moe_align_block_size: block_m must be a power of two, got {block_m}")
    ids = topk_ids.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    num_ids = ids.numel()
    capacity = sorted_capacity(num_ids, num_experts, block_m)
    num_blocks = capacity // block_m
    if buffers is not None:
        sorted_ids, expert_ids, post_padded, counts = buffers.views(
            topk_ids.shape[0], topk_ids.shape[1], num_experts, block_m
        )
    else:
        sorted_ids = torch.empty(capacity, dtype=torch.int32, device=ids.device)
        expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=ids.device)
        post_padded = torch.empty(1, dtype=torch.int32, device=ids.device)
        counts = None
    if num_ids == 0:
        post_padded.zero_()
        return sorted_ids, expert_ids, post_padded
    ids_pow2 = triton.next_power_of_2(num_ids)
    experts_pow2 = triton.next_power_of_2(num_experts)
    if single_program is None:
        limit = SINGLE_PROGRAM_ELEMENTS_INTERPRETED if interpreting() else SINGLE_PROGRAM_ELEMENTS
        single_program = ids_pow2 * experts_pow2 <= limit
    if single_program:
        _align_single_kernel[(1,)](
            ids,
            sorted_ids,
            expert_ids,
            post_padded,
            num_ids,
            num_experts,
            capacity,
            num_blocks,
            BLOCK_M=block_m,
            IDS=ids_pow2,
            EXPERTS=experts_pow2,
            FILL=min(1024, triton.next_power_of_2(capacity)),
            num_warps=4,  # pyright: ignore[reportCallIssue]  # triton launch option
        )
        return sorted_ids, expert_ids, post_padded
    if counts is None:
        counts = torch.empty(num_experts, dtype=torch.int32, device=ids.device)
    block = min(1024, ids_pow2)
    _align_count_kernel[(num_experts,)](ids, counts, num_ids, BLOCK=block)
    _align_place_kernel[(num_experts,)](
        ids,
        counts,
        sorted_ids,
        expert_ids,
        post_padded,
        num_ids,
        num_experts,
        capacity,
        num_blocks,
        BLOCK_M=block_m,
        EXPERTS=experts_pow2,
        BLOCK=block,
    )
    return sorted_ids, expert_ids, post_padded


# ---------------------------------------------------------------------------------------------------------------------
# The grouped GEMMs and the top-k sum.


@triton.jit
def _moe_gemm_kernel(
    a_ptr,  # GATED: hidden [M, K]; ROUTED: the intermediate [M * k, K]
    w_ptr,  # GATED: w13 [E, 2n, K] (gate rows, then up rows); ROUTED: w2 [E, n, K]
    out_ptr,  # [M * k, n]: row m * k + j (ROUTED with k = 1: the output [M, n])
    weights_ptr,  # ROUTED: [M * k] float32 routing weights
    sorted_ptr,  # [num_blocks * BLOCK_M] int32 flat entries, by expert
    expert_ids_ptr,  # [num_blocks] int32
    post_padded_ptr,  # [1] int32: slots in use
    num_ids,  # M * k: the padding value
    n,
    k_dim,
    stride_am,
    stride_we,
    stride_wn,
    stride_om,
    num_blocks,
    A_ROW_DIV: tl.constexpr,  # an entry's row of a: entry // A_ROW_DIV (GATED: top_k; ROUTED: 1)
    ACT: tl.constexpr,  # GATED: an `ACTIVATION_CODES` code; ROUTED: -1
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (exact products, not tf32), else "tf32" (unused)
):
    # Programs in groups of GROUP_M sorted blocks, the blocks fastest within a group (the usual swizzle: a group's
    # programs share tiles of w in L2 when an expert spans several blocks).
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(n, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    if pid_m * BLOCK_M >= tl.load(post_padded_ptr):
        return  # past the last expert's run (the grid covers the most blocks any routing can need)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    entries = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BM]
    valid = entries < num_ids
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    w_rows = cols % n  # in bounds without a mask; the columns past n are not stored
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (entries // A_ROW_DIV).to(tl.int64)[:, None] * stride_am + ks[None, :]  # [BM, BK]
    w_ptrs = w_ptr + expert * stride_we + w_rows.to(tl.int64)[None, :] * stride_wn + ks[:, None]  # [BK, BN]
    up_ptrs = w_ptrs + n * stride_wn  # GATED: the matching up rows
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, k_dim, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs + start, mask=valid[:, None], other=0.0)
            w = tl.load(w_ptrs + start)
        else:
            k_mask = (start + ks) < k_dim
            a = tl.load(a_ptrs + start, mask=valid[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs + start, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        if ACT >= 0:
            if EVEN_K:  # noqa: SIM108 - a compile-time branch
                w_up = tl.load(up_ptrs + start)
            else:
                w_up = tl.load(up_ptrs + start, mask=k_mask[:, None], other=0.0)
            acc_up = tl.dot(a, w_up, acc_up, input_precision=DOT_PRECISION)
    if ACT >= 0:
        result = activate(acc, ACT) * acc_up
    else:
        result = acc * tl.load(weights_ptr + entries, mask=valid, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + entries.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (cols < n)[None, :])


@triton.jit
def _moe_sum_kernel(y_ptr, out_ptr, hidden, stride_om, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    # out[m] = the float32 sum of y[m * k + j] over j, rounded once.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    acc = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(y_ptr + (row * TOP_K + j) * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _grouped_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    weights: torch.Tensor | None,
    sort: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    num_ids: int,
    top_k: int,
    act: int,
    launch: dict,
    block_m: int,
) -> None:
    """One grouped GEMM launch (GATED when `act` >= 0, else ROUTED by `weights`)."""
    sorted_ids, expert_ids, post_padded = sort
    n = w.shape[1] // 2 if act >= 0 else w.shape[1]
    k_dim = w.shape[2]
    num_blocks = expert_ids.numel()
    grid = (num_blocks * triton.cdiv(n, launch["block_n"]),)
    _moe_gemm_kernel[grid](
        a,
        w,
        out,
        weights if weights is not None else out,
        sorted_ids,
        expert_ids,
        post_padded,
        num_ids,
        n,
        k_dim,
        a.stride(0),
        w.stride(0),
        w.stride(1),
        out.stride(0),
        num_blocks,
        A_ROW_DIV=top_k if act >= 0 else 1,
        ACT=act,
        BLOCK_M=block_m,
        BLOCK_N=launch["block_n"],
        BLOCK_K=launch["block_k"],
        GROUP_M=launch["group_m"],
        EVEN_K=k_dim % launch["block_k"] == 0,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        num_warps=launch["num_warps"],  # pyright: ignore[reportCallIssue]  # triton launch option
        num_stages=launch["num_stages"],  # pyright: ignore[reportCallIssue]  # triton launch option
    )


# ---------------------------------------------------------------------------------------------------------------------
# Launch configurations.

TUNING_SETTING = "fused_moe tuning table"
DEFAULT_TUNING = str(Path(__file__).with_name("fused_moe_tuning.json"))


def default_config(m: int, num_experts: int, top_k: int) -> dict:
    """The untuned launch for `m` rows, by the average tokens per expert (m * k / E): BLOCK_M 16 and narrow tiles
    for decode (a block holds one token or a few; the GEMMs stream the touched experts' weights), larger tiles as
    the experts' runs grow."""
    per_expert = m * top_k / max(num_experts, 1)
    if per_expert <= 2:
        return {"block_m": 16, "block_n": 32, "block_k": 128, "group_m": 1, "num_warps": 4, "num_stages": 4}
    if per_expert <= 8:
        return {"block_m": 16, "block_n": 64, "block_k": 128, "group_m": 1, "num_warps": 4, "num_stages": 3}
    if per_expert <= 16:
        return {"block_m": 32, "block_n": 128, "block_k": 64, "group_m": 1, "num_warps": 8, "num_stages": 3}
    if per_expert <= 64:
        return {"block_m": 64, "block_n": 128, "block_k": 64, "group_m": 1, "num_warps": 8, "num_stages": 4}
    return {"block_m": 128, "block_n": 128, "block_k": 64, "group_m": 8, "num_warps": 8, "num_stages": 4}


@functools.cache
def load_fused_moe_table(path: str, device_name: str | None = None, named: bool = False) -> dict[str, list]:
    """The tuned configs by shape, "E:I:H:dtype" (dtype as torch names it: bfloat16, float16, float32) -> [(rows,
    config)] sorted by rows, from the JSON {"device": card, "configs": {"E:I:H:dtype": {"rows": config}}} at `path`
    (read once). Empty for "none", a missing shipped file, or a file measured on another card than `device_name`."""
    data = read_tuning_file(path, TUNING_SETTING, named)
    if data is None or (device_name is not None and data.get("device") not in (None, device_name)):
        return {}
    table: dict[str, list] = {}
    for shape, by_rows in data["configs"].items():
        entries = []
        for rows, config in by_rows.items():
            _check_config(config, f"{path}: {shape}: {rows}")
            entries.append((int(rows), config))
        table[shape] = sorted(entries, key=lambda entry: entry[0])
    return table


def launch_config(
    m: int,
    num_experts: int,
    intermediate: int,
    hidden: int,
    top_k: int,
    dtype: torch.dtype,
    device: torch.device,
    table_path: str = DEFAULT_TUNING,
) -> dict:
    """The tuned config for (E, I, H, dtype) on this card, the entry of the fewest rows measured at or above `m`
    (the largest beyond them), else `default_config`."""
    table = load_fused_moe_table(table_path, cuda_device_name(device))
    entries = table.get(f"{num_experts}:{intermediate}:{hidden}:{str(dtype).removeprefix('torch.')}")
    if entries:
        return next((config for rows, config in entries if rows >= m), entries[-1][1])
    return default_config(m, num_experts, top_k)


def _check_config(config: dict, where: str) -> None:
    """A ValueError unless `config` names exactly `CONFIG_KEYS` (plus an optional "w2" dict of them but block_m),
    with power-of-two blocks."""
    if not isinstance(config, dict) or sorted(set(config) - {"w2"}) != sorted(CONFIG_KEYS):
        raise ValueError(f"{where}: a fused-MoE config names exactly {', '.join(CONFIG_KEYS)} (and optionally w2)")
    w2 = config.get("w2", {})
    if not isinstance(w2, dict) or not set(w2) <= set(CONFIG_KEYS) - {"block_m"}:
        raise ValueError(f"{where}: the w2 override may name {', '.join(CONFIG_KEYS[1:])}")
    for key, value in (*config.items(), *w2.items()):
        if key == "w2":
            continue
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {key} must be a positive int, got {value!r}")
        if key.startswith("block_") and value & (value - 1):
            raise ValueError(f"{where}: {key} must be a power of two, got {value}")
        if key.startswith("block_") and value < 16 and not interpreting():
            raise ValueError(f"{where}: {key} must be at least 16 on the GPU (tl.dot), got {value}")


# ---------------------------------------------------------------------------------------------------------------------
# The entry point.


def fused_moe(
    hidden: torch.Tensor,  # [M, H]
    w13: torch.Tensor,  # [E, 2I, H]: gate rows, then up rows
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [M, k] float32
    topk_ids: torch.Tensor,  # [M, k] int32 / int64, in [0, E)
    activation: str = "silu",
    config: dict | None = None,
    *,
    buffers: MoEBuffers | None = None,  # preallocated sort outputs (CUDA graphs)
) -> torch.Tensor:  # [M, H] in hidden's dtype
    """sum_j topk_weights[:, j] * w2[e] @ (act(w13[e, :I] @ h) * (w13[e, I:] @ h)), e = topk_ids[:, j]."""
    check_cuda_or_interpreter(hidden, w13, w2, topk_weights, topk_ids)
    if activation not in MOE_ACTIVATIONS:
        raise ValueError(f"fused_moe: activation {activation!r} is not supported ({', '.join(MOE_ACTIVATIONS)})")
    if hidden.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"fused_moe: hidden {tuple(hidden.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    m, h = hidden.shape
    num_experts, two_i, _ = w13.shape
    intermediate = two_i // 2
    if two_i % 2 or w13.shape[2] != h or w2.shape != (num_experts, h, intermediate):
        raise ValueError(
            f"fused_moe: w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} are not [E, 2I, {h}] and [E, {h}, I]"
        )
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != m:
        raise ValueError(
            f"fused_moe: topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} are not [{m}, k]"
        )
    if w13.dtype != hidden.dtype or w2.dtype != hidden.dtype:
        raise ValueError(f"fused_moe: hidden, w13 and w2 must share a dtype ({hidden.dtype}, {w13.dtype}, {w2.dtype})")
    if hidden.stride(1) != 1 or w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("fused_moe: the last dimension of hidden, w13 and w2 must be contiguous")
    top_k = topk_ids.shape[1]
    out = hidden.new_empty((m, h))
    if m == 0:
        return out
    if config is None:
        config = launch_config(m, num_experts, intermediate, h, top_k, hidden.dtype, hidden.device)
    _check_config(config, "fused_moe config")
    act = MOE_ACTIVATIONS[activation]
    for start in range(0, m, CHUNK_TOKENS):
        stop = min(start + CHUNK_TOKENS, m)
        _fused_moe_rows(
            hidden[start:stop],
            w13,
            w2,
            topk_weights[start:stop],
            topk_ids[start:stop],
            out[start:stop],
            act,
            config,
            buffers,
        )
    return out


def _fused_moe_rows(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    out: torch.Tensor,
    act: int,
    config: dict,
    buffers: MoEBuffers | None,
) -> None:
    """`fused_moe` for one chunk of rows, written into `out`."""
    m, h = hidden.shape
    num_experts, two_i, _ = w13.shape
    top_k = topk_ids.shape[1]
    num_ids = m * top_k
    block_m = config["block_m"]
    sort = moe_align_block_size(topk_ids, num_experts, block_m, buffers=buffers)
    weights = topk_weights.reshape(-1)
    if not weights.is_contiguous():
        weights = weights.contiguous()
    launch1 = {key: config[key] for key in CONFIG_KEYS}
    launch2 = {**launch1, **config.get("w2", {})}
    inter = hidden.new_empty((num_ids, two_i // 2))  # [M * k, I]
    _grouped_gemm(hidden, w13, inter, None, sort, num_ids, top_k, act, launch1, block_m)
    if top_k == 1:
        _grouped_gemm(inter, w2, out, weights, sort, num_ids, top_k, -1, launch2, block_m)
        return
    y = hidden.new_empty((num_ids, h))  # [M * k, H]: the weighted expert outputs
    _grouped_gemm(inter, w2, y, weights, sort, num_ids, top_k, -1, launch2, block_m)
    block = min(1024, triton.next_power_of_2(h))
    _moe_sum_kernel[(m, triton.cdiv(h, block))](y, out, h, out.stride(0), TOP_K=top_k, BLOCK=block)
