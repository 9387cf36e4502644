"""Plain-torch references of the Triton kernels, in float32 math, written for clarity rather than speed.

Each function computes what its kernel must, from the same arguments, with no triton: the kernel tests compare the
two on random inputs. They run anywhere torch runs.
"""

from __future__ import annotations

import math

import torch

from lm_torch.sampling import ops


def store_kv_cache(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], written in place
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int: block * block_size + offset; negative = padding, not written
) -> None:
    """Write token t's K/V at flat slot `slot_mapping[t]` of the caches."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]: each sequence's new tokens, in sequence order
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], already holding the new tokens
    v_cache: torch.Tensor,
    query_lens: list[int],
    context_lens: list[int],
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim] float32
    """Causal attention of each sequence's new tokens (the last `query_lens[i]` of its `context_lens[i]` positions).

    A query at position p sees keys at positions in (p - sliding_window, p]; scores are `scale * q.k`, then
    `softcap * tanh(score / softcap)` when soft-capping.
    """
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    first = 0
    for i, (num_new, ctx) in enumerate(zip(query_lens, context_lens, strict=True)):
        positions = torch.arange(ctx, device=q.device)
        slots = block_tables[i, positions // block_size].long() * block_size + positions % block_size
        keys = k_cache.view(-1, num_kv_heads, k_cache.shape[3])[slots].float()  # [ctx, num_kv_heads, head_dim]
        values = v_cache.view(-1, num_kv_heads, v_cache.shape[3])[slots].float()
        keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [num_heads, ctx, head_dim]
        values = values.repeat_interleave(group, dim=1).transpose(0, 1)
        queries = q[first : first + num_new].float().transpose(0, 1)  # [num_heads, num_new, head_dim]
        scores = queries @ keys.transpose(1, 2) * scale  # [num_heads, num_new, ctx]
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        query_positions = torch.arange(ctx - num_new, ctx, device=q.device)[:, None]
        visible = positions[None, :] <= query_positions
        if sliding_window is not None:
            visible &= positions[None, :] > query_positions - sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
        out[first : first + num_new] = (torch.softmax(scores, dim=-1) @ values).transpose(0, 1)
        first += num_new
    return out


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,
    offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(norm(x + residual), x + residual) with the rounding of `lm_torch.layers.norm.RMSNorm`.

    The sum is rounded to x's dtype (it is the residual stream); the norm is float32; Llama (`offset` 0) rounds the
    normalised value to x's dtype before the weight, Gemma (`offset` 1, weight stored as w - 1) scales in float32.
    """
    dtype = x.dtype
    if residual is not None:
        x = (x.float() + residual.float()).to(dtype)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0:
        out = (h.to(dtype).float() * weight.float()).to(dtype)
    else:
        out = (h * (offset + weight.float())).to(dtype)
    return out, (x if residual is not None else None)


def rotary(
    positions: torch.Tensor,  # [num_tokens] int
    x: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    cos: torch.Tensor,  # [max_positions, rotary_dim]: cos(position * inv_freq), the half of freqs written twice
    sin: torch.Tensor,
    is_neox: bool = True,
) -> torch.Tensor:
    """x with its first `rotary_dim` features of every head rotated by position (float32 math, x's dtype out).

    neox pairs feature i with i + rotary_dim / 2 (Llama and most HF models); gptj pairs 2i with 2i + 1.
    """
    rotary_dim = cos.shape[-1]
    half = rotary_dim // 2
    c = cos[positions, :half].float()[:, None, :]  # [num_tokens, 1, half]
    s = sin[positions, :half].float()[:, None, :]
    out = x.float().clone()
    if is_neox:
        x1, x2 = out[..., :half].clone(), out[..., half:rotary_dim].clone()
        out[..., :half] = x1 * c - x2 * s
        out[..., half:rotary_dim] = x2 * c + x1 * s
    else:
        x1, x2 = out[..., 0:rotary_dim:2].clone(), out[..., 1:rotary_dim:2].clone()
        out[..., 0:rotary_dim:2] = x1 * c - x2 * s
        out[..., 1:rotary_dim:2] = x2 * c + x1 * s
    return out.to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T in float32: x [rows, K], weight [N, K] -> [rows, N] (the GEMV kernel's reference)."""
    return x.float() @ weight.float().t()


def gated_activation(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up in float32, x's dtype out; gate_up: [..., 2 * intermediate] (gate first)."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    if act == "silu":
        activated = gate * torch.sigmoid(gate)
    elif act == "gelu":
        activated = 0.5 * gate * (1.0 + torch.erf(gate / math.sqrt(2.0)))
    elif act in ("gelu_pytorch_tanh", "gelu_new"):
        activated = 0.5 * gate * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (gate + 0.044715 * gate**3)))
    else:
        raise ValueError(f"activation {act!r} is not supported")
    return (activated * up).to(gate_up.dtype)


def sample(
    logits: torch.Tensor,  # [batch, >= vocab_size] processed logits (penalties, biases and bans already applied)
    temperature: torch.Tensor,  # [batch] float; <= 0 means greedy
    top_k: torch.Tensor,  # [batch] int, 0 = off
    top_p: torch.Tensor,  # [batch] float in (0, 1], 1 = off
    min_p: torch.Tensor,  # [batch] float in [0, 1], 0 = off
    uniforms: torch.Tensor,  # [batch] float in [0, 1)
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [batch] int64, thresholds [batch] float32) through the plain-torch sampler's own stages.

    Greedy rows take the arg-max (threshold -inf); the others are divided by their temperature, truncated by
    `lm_torch.sampling.ops.truncation_thresholds` and drawn by `ops.sample_inverse_cdf` with the given uniform.
    """
    vocab_size = logits.shape[1] if vocab_size is None else vocab_size
    logits = logits[:, :vocab_size].float()
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, 1.0, temperature.float())[:, None]
    k = torch.where(greedy | (top_k >= vocab_size), 0, top_k).long()
    p = torch.where(greedy, 1.0, top_p.float())
    m = torch.where(greedy, 0.0, min_p.float())
    # The widest ranking: every row's nucleus is resolved without the sampler's candidate shortcut.
    threshold = ops.truncation_thresholds(scaled, None, k, p, m, vocab_size)
    threshold = threshold if threshold is not None else torch.full_like(scaled[:, :1], float("-inf"))
    threshold = torch.where(greedy[:, None], float("-inf"), threshold)
    tokens = ops.sample_inverse_cdf(scaled, threshold, uniforms.float())
    tokens = torch.where(greedy, logits.argmax(dim=-1), tokens)
    return tokens, threshold.squeeze(1)


def unpack_int4(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K / 8] int32 words of the W4A16 layout -> [N, K] int64 values in [0, 16): in blocks of B = min(group_size,
    128) inputs, word j of a block holds input t * (B / 8) + j of the block in bits 4t .. 4t + 3."""
    block = min(group_size, 128)
    n, num_words = packed.shape
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * 4
    fields = (packed.to(torch.int64)[..., None] >> shifts) & 0xF  # [N, K / 8, 8]: [row, word, t]
    return fields.view(n, num_words * 8 // block, block // 8, 8).transpose(2, 3).reshape(n, num_words * 8)


def w4a16_linear(
    x: torch.Tensor,  # [M, K]
    packed: torch.Tensor,  # [N, K / 8] int32
    scales: torch.Tensor,  # [K / group_size, N]
    zeros: torch.Tensor,  # [K / group_size, N]
    group_size: int,
) -> torch.Tensor:  # [M, N] float32
    """x @ W^T with W[n, k] = (q[n, k] - zeros[k // g, n]) * scales[k // g, n], dequantized in float32."""
    q = unpack_int4(packed, group_size).float()  # [N, K]
    z = zeros.float().t().repeat_interleave(group_size, dim=1)  # [N, K]
    s = scales.float().t().repeat_interleave(group_size, dim=1)
    return x.float() @ ((q - z) * s).t()


def quantize_per_token(x: torch.Tensor, qmax: float = 127.0) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (round(x / s) clamped to [-qmax, qmax] as float32 integers [M, K], s [M, 1] float32) with
    s = max_k |x[m, k]| / qmax (at least 1e-7 / qmax), rounding half to even."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-7) / qmax
    return torch.round(x / scale).clamp(-qmax, qmax), scale


def w8a8_linear(
    x_q: torch.Tensor,  # [M, K] int8
    x_scale: torch.Tensor,  # [M, 1] float32
    weight: torch.Tensor,  # [N, K] int8
    weight_scale: torch.Tensor,  # [N, 1] float32
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [M, N] float32
    """(x_q @ weight^T) in exact integer sums, times the token's and the channel's scales, plus bias."""
    acc = (x_q.double() @ weight.double().t()).float()  # float64 holds these integer sums exactly
    out = acc * x_scale.float() * weight_scale.float().t()
    return out if bias is None else out + bias.float()


def store_kv_cache_quantized(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, packed_dim] uint8, written in place
    v_cache: torch.Tensor,
    k_scales_zeros: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, 2], written in place
    v_scales_zeros: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int; negative = padding, not written
    quant_policy: int,
) -> None:
    """Quantize token t's K/V (`lm_torch.kv_quant.quantize_kv`: int8 or int4, a scale and zero per head) into flat
    slot `slot_mapping[t]` of the caches."""
    from lm_torch.kv_quant import quantize_kv

    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    for x, cache, params in ((k, k_cache, k_scales_zeros), (v, v_cache, v_scales_zeros)):
        codes, scales_zeros = quantize_kv(x[keep], quant_policy, params.dtype)
        cache.view(-1, *cache.shape[2:])[slots] = codes
        params.view(-1, *params.shape[2:])[slots] = scales_zeros


def dequantize_cache(
    cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, packed_dim] uint8
    scales_zeros: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, 2]
    quant_policy: int,
) -> torch.Tensor:  # [num_blocks, block_size, num_kv_heads, head_dim] float32
    """A whole quantized cache as float32 values (`paged_attention` over it is what the kernels must compute from
    the codes)."""
    from lm_torch.kv_quant import dequantize_kv

    return dequantize_kv(cache, scales_zeros, quant_policy, torch.float32)


def fused_moe(
    hidden: torch.Tensor,  # [M, H]
    w13: torch.Tensor,  # [E, 2I, H]: gate rows, then up rows
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [M, k] float
    topk_ids: torch.Tensor,  # [M, k] int, in [0, E)
    activation: str = "silu",
    config: dict | None = None,  # the kernel's launch config: ignored here
) -> torch.Tensor:  # [M, H] in hidden's dtype
    """sum_j topk_weights[m, j] * w2[e] @ (act(w13[e, :I] @ h) * (w13[e, I:] @ h)), e = topk_ids[m, j], one expert
    at a time in float32, rounded where the kernel rounds: act(gate) * up and each weighted expert output to hidden's
    dtype, the sum over j once at the end."""
    del config
    dtype = hidden.dtype
    act = "gelu_pytorch_tanh" if activation == "gelu_tanh" else activation
    num_tokens, top_k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1).long()  # [M * k]: entry m * k + j
    flat_weights = topk_weights.reshape(-1).float()
    rows = torch.arange(num_tokens * top_k, device=hidden.device) // top_k  # [M * k]: each entry's token
    x = hidden.float()
    out = torch.zeros(num_tokens, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    for expert in flat_ids.unique().tolist():
        entries = (flat_ids == expert).nonzero().squeeze(1)
        gate_up = x[rows[entries]] @ w13[expert].float().t()  # [n, 2I]
        inter = gated_activation(gate_up, act).to(dtype).float()  # [n, I]
        y = (inter @ w2[expert].float().t()) * flat_weights[entries, None]  # [n, H]
        out.index_add_(0, rows[entries], y.to(dtype).float())
    return out.to(dtype)
