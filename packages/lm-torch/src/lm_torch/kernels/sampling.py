"""Sampling on the GPU: temperature, top-k, top-p, min-p and one inverse-CDF draw per row, with no sort.

One program takes one row and streams its logits several times (they stay in L2 for moderate batches). It follows
`lm_torch.sampling.ops` stage by stage, so that with the same uniforms it draws the same tokens as the plain-torch
sampler (up to float rounding at a CDF boundary, since sums run in another order):

- top-k: the k-th largest logit (counting ties) is found by bisection over the logits' bit patterns, ordered as
  integers; each step counts the logits at or above a pivot and then jumps to the nearest logit on the kept side, so
  it ends on an actual logit after at most 32 passes (usually fewer);
- top-p, over what top-k kept: the smallest logit v whose strictly more likely tokens hold less than p of the mass,
  found by the same bisection on the mass above a pivot;
- min-p: max logit + log(min_p);
- the draw: the CDF of exp(logit - max) over the kept tokens runs in vocabulary order, and the first token whose
  cumulative weight exceeds uniform * total is taken, as `ops.sample_inverse_cdf` does.

A row with temperature <= 0 is greedy: the first arg-max. Every per-row setting is a device tensor and nothing is
read back to the host, so a CUDA graph can capture the whole step.
"""

# Triton's type stubs describe host Python, not the @triton.jit language, so these rules are off here:
# reportOperatorIssue: `tl` reductions and loads are typed `tensor | tuple`, so arithmetic on their results is
#   rejected.
# reportAttributeAccessIssue: `tl` reductions and loads are typed `tensor | tuple` (and loop-carried values start as
#   Python numbers), so `.to` on them is rejected.
# pyright: reportOperatorIssue=false, reportAttributeAccessIssue=false

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lm_torch.kernels.common import check_cuda_or_interpreter, interpreting, multiprocessor_count


@triton.jit
def _ordered_key(x):
    """float32 -> int32 in the same order (-0.0 folded onto +0.0, which compare equal as floats)."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _key_value(key):
    bits = key ^ ((key >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _scaled_logits(row_ptr, offsets, vocab, temperature):
    x = tl.load(row_ptr + offsets, mask=offsets < vocab, other=float("-inf")).to(tl.float32)
    return tl.math.div_rn(x, temperature)  # the correctly rounded quotient, as torch divides


@triton.jit
def _pivot(lo, hi):
    """A key in (lo, hi], halfway (int64 arithmetic: the difference of two int32 keys can overflow int32)."""
    return (lo.to(tl.int64) + (hi.to(tl.int64) - lo.to(tl.int64) + 1) // 2).to(tl.int32)


@triton.jit
def _kth_largest_key(row_ptr, vocab, temperature, k, lo, hi, BLOCK: tl.constexpr):
    """The key of the k-th largest logit, ties counted. lo, hi: the smallest and largest keys of the row."""
    # Invariant: the answer is a key of the row, in [lo, hi].
    while lo < hi:
        pivot = _pivot(lo, hi)
        count = 0
        above = hi  # smallest key >= pivot (hi is one)
        below = lo  # largest key < pivot (lo is one)
        for start in range(0, vocab, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            valid = offsets < vocab
            key = _ordered_key(_scaled_logits(row_ptr, offsets, vocab, temperature))
            at_or_above = valid & (key >= pivot)
            count += tl.sum(at_or_above.to(tl.int32), 0)
            above = tl.minimum(above, tl.min(tl.where(at_or_above, key, hi), 0))
            below = tl.maximum(below, tl.max(tl.where(valid & (key < pivot), key, lo), 0))
        if count >= k:
            lo = above  # the answer is >= pivot, so >= the smallest key there
        else:
            hi = below
    return lo


@triton.jit
def _nucleus_key(row_ptr, vocab, temperature, p, top, lo, hi, BLOCK: tl.constexpr):
    """The key of the smallest logit >= key lo whose strictly larger logits hold less than p of the mass (over
    logits >= lo). hi: the largest key (the top token, which always stays)."""
    total = 0.0
    for start in range(0, vocab, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        x = _scaled_logits(row_ptr, offsets, vocab, temperature)
        kept = (offsets < vocab) & (_ordered_key(x) >= lo)
        total += tl.sum(tl.where(kept, tl.exp(x - top), 0.0), 0)
    # Invariant: the answer is a key of the row in [lo, hi]. The mass strictly above the largest key b below a
    # pivot is the mass at or above the pivot: below p, the answer is <= b; else it is >= the pivot.
    while lo < hi:
        pivot = _pivot(lo, hi)
        mass = 0.0
        above = hi
        below = lo
        for start in range(0, vocab, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            valid = offsets < vocab
            x = _scaled_logits(row_ptr, offsets, vocab, temperature)
            key = _ordered_key(x)
            at_or_above = valid & (key >= pivot)
            mass += tl.sum(tl.where(at_or_above, tl.exp(x - top), 0.0), 0)
            above = tl.minimum(above, tl.min(tl.where(at_or_above, key, hi), 0))
            below = tl.maximum(below, tl.max(tl.where(valid & (key < pivot), key, lo), 0))
        if mass / total < p:
            hi = below
        else:
            lo = above
    return lo


@triton.jit
def _cumulative_weights(row_ptr, offsets, vocab, temperature, top, threshold, running):
    """(weights, running + their inclusive cumsum) of one block: exp(x - top) for kept tokens, 0 for the rest."""
    x = _scaled_logits(row_ptr, offsets, vocab, temperature)
    weights = tl.where((offsets < vocab) & (x >= threshold), tl.exp(x - top), 0.0)
    return weights, tl.cumsum(weights, 0) + running


@triton.jit
def _draw(row_ptr, vocab, temperature, top, threshold, uniform, BLOCK: tl.constexpr):
    """The first token whose cumulative weight exceeds uniform * total (vocabulary order)."""
    # The total comes from the same block-wise sums as the scan below, so the scan reaches it exactly.
    total = 0.0
    for start in range(0, vocab, BLOCK):
        _, cumulative = _cumulative_weights(
            row_ptr, start + tl.arange(0, BLOCK), vocab, temperature, top, threshold, total
        )
        total = tl.max(cumulative, 0)  # the block's last sum: weights are >= 0
    previous = (total.to(tl.int32, bitcast=True) - 1).to(tl.float32, bitcast=True)  # the float just below total
    target = tl.minimum(uniform * total, previous)
    token = -1
    last_weighted = -1  # fallback: the last token with weight, should rounding leave the target unreached
    running = 0.0
    start = 0
    while (start < vocab) & (token < 0):
        offsets = start + tl.arange(0, BLOCK)
        weights, cumulative = _cumulative_weights(row_ptr, offsets, vocab, temperature, top, threshold, running)
        # A zero-weight token repeats its predecessor's sum, so the first sum past the target has weight.
        hit = tl.min(tl.where(cumulative > target, offsets, vocab), 0)
        token = tl.where(hit < vocab, hit, token)
        last_weighted = tl.maximum(last_weighted, tl.max(tl.where(weights > 0, offsets, -1), 0))
        running = tl.max(cumulative, 0)
        start += BLOCK
    return tl.where(token < 0, last_weighted, token)


@triton.jit
def _sample_kernel(
    logits_ptr,
    stride_row,
    vocab,
    temperature_ptr,
    top_k_ptr,
    top_p_ptr,
    log_min_p_ptr,
    uniform_ptr,
    tokens_ptr,
    thresholds_ptr,
    BLOCK: tl.constexpr,
    HAS_TOP_K: tl.constexpr,
    HAS_TOP_P: tl.constexpr,
    HAS_MIN_P: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    temperature = tl.load(temperature_ptr + row).to(tl.float32)
    greedy = temperature <= 0.0
    temperature = tl.where(greedy, 1.0, temperature)

    # Pass 1: the largest logit, its first index (greedy rows), and the smallest key.
    top = float("-inf")
    top_index = 0
    low_key = 2147483647
    for start in range(0, vocab, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        x = _scaled_logits(row_ptr, offsets, vocab, temperature)
        block_top = tl.max(x, 0)
        block_index = tl.min(tl.where(x == block_top, offsets, vocab), 0)
        top_index = tl.where(block_top > top, block_index, top_index)
        top = tl.maximum(top, block_top)
        low_key = tl.minimum(low_key, tl.min(tl.where(offsets < vocab, _ordered_key(x), 2147483647), 0))

    threshold = float("-inf")
    if greedy:
        token = top_index
    else:
        top_key = _ordered_key(top)
        floor_key = low_key  # what top-k keeps: every key >= floor_key
        if HAS_TOP_K:
            k = tl.load(top_k_ptr + row).to(tl.int32)
            if (k > 0) & (k < vocab):
                floor_key = _kth_largest_key(row_ptr, vocab, temperature, k, low_key, top_key, BLOCK)
                threshold = _key_value(floor_key)
        if HAS_TOP_P:
            p = tl.load(top_p_ptr + row).to(tl.float32)
            if p < 1.0:
                nucleus = _nucleus_key(row_ptr, vocab, temperature, p, top, floor_key, top_key, BLOCK)
                threshold = tl.maximum(threshold, _key_value(nucleus))
        if HAS_MIN_P:
            threshold = tl.maximum(threshold, top + tl.load(log_min_p_ptr + row).to(tl.float32))
        token = _draw(row_ptr, vocab, temperature, top, threshold, tl.load(uniform_ptr + row).to(tl.float32), BLOCK)
    tl.store(thresholds_ptr + row, threshold)
    tl.store(tokens_ptr + row, token.to(tl.int64))


def sample(
    logits: torch.Tensor,  # [batch, >= vocab_size] any float dtype: after penalties, biases and bans
    temperature: torch.Tensor,  # [batch] float; <= 0 = greedy
    uniforms: torch.Tensor,  # [batch] float in [0, 1): each row's draw
    top_k: torch.Tensor | None = None,  # [batch] int, 0 (or >= vocab_size) = off
    top_p: torch.Tensor | None = None,  # [batch] float in (0, 1], 1 = off
    min_p: torch.Tensor | None = None,  # [batch] float in [0, 1], 0 = off
    vocab_size: int | None = None,  # columns past it (a padded LM head) are never drawn
    *,
    block: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [batch] int64, thresholds [batch] float32: the smallest temperature-scaled logit each row kept).

    Setting tensors left None switch their stage off for every row (and out of the compiled kernel). `block` and
    `num_warps` override the launch shape (for tuning): by default a batch smaller than the GPU gives each row's
    program wide steps and many warps (one program per row leaves most of the GPU idle, so its latency is the cost).
    """
    check_cuda_or_interpreter(logits, temperature, uniforms)
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"sample: logits must be [batch, vocab] with contiguous rows, got {tuple(logits.shape)}")
    batch = logits.shape[0]
    vocab = logits.shape[1] if vocab_size is None else vocab_size
    if not 0 < vocab <= logits.shape[1]:
        raise ValueError(f"sample: vocab_size {vocab} does not fit logits of {logits.shape[1]} columns")
    for name, value in (("temperature", temperature), ("uniforms", uniforms), ("top_k", top_k), ("top_p", top_p)):
        if value is not None and value.shape != (batch,):
            raise ValueError(f"sample: {name} must have shape ({batch},), got {tuple(value.shape)}")
    if min_p is not None and min_p.shape != (batch,):
        raise ValueError(f"sample: min_p must have shape ({batch},), got {tuple(min_p.shape)}")
    tokens = torch.empty(batch, dtype=torch.int64, device=logits.device)
    thresholds = torch.empty(batch, dtype=torch.float32, device=logits.device)
    if batch == 0:
        return tokens, thresholds
    # log(min_p) in torch, as the reference computes it (log(0) = -inf keeps every token).
    log_min_p = min_p.float().log() if min_p is not None else None
    if interpreting():
        default_block, default_warps = 512, 4
    elif batch < multiprocessor_count(logits.device):
        default_block, default_warps = 8192, 16
    else:
        default_block, default_warps = 4096, 8
    block = min(block or default_block, triton.next_power_of_2(vocab))
    _sample_kernel[(batch,)](
        logits,
        logits.stride(0),
        vocab,
        temperature,
        top_k if top_k is not None else tokens,  # placeholders are never read when their stage is off
        top_p if top_p is not None else thresholds,
        log_min_p if log_min_p is not None else thresholds,
        uniforms,
        tokens,
        thresholds,
        BLOCK=block,
        HAS_TOP_K=top_k is not None,
        HAS_TOP_P=top_p is not None,
        HAS_MIN_P=min_p is not None,
        num_warps=num_warps or default_warps,  # pyright: ignore[reportCallIssue]  # triton launch option
    )
    return tokens, thresholds
