"""Online KV-cache quantization (`quant_policy`, as in LMDeploy): K and V stored as int8 or int4 in the paged cache.

Every (token, kv head) of K and of V gets its own asymmetric quantization, computed as the token is written (no
calibration): `scale = (max - min) / levels`, `zero = min`, `q = round((x - zero) / scale)` with 255 levels for int8
and 15 for int4, and `x ~ q * scale + zero` when attention reads it back. A layer's cache is a `KVCache`:

- `k`, `v`: `[num_blocks, block_size, num_kv_heads, packed_dim]` uint8. int8 (`quant_policy=8`) keeps feature d at
  byte d (packed_dim = head_dim); int4 (`quant_policy=4`) puts features j and j + head_dim/2 in byte j, low nibble
  first (packed_dim = head_dim / 2), so that a kernel unpacks a tile into its two halves with a mask and a shift.
- `k_scales_zeros`, `v_scales_zeros`: `[num_blocks, block_size, num_kv_heads, 2]`, (scale, zero) per slot and head,
  float32 for a float32 model, else float16 (bf16's 8-bit mantissa would add an error as large as int8's own step).

Quantization runs on the scale and zero as stored (rounded to their dtype), so dequantizing reverses exactly what
was quantized. Blocks stay blocks: prefix caching and preemption see no difference. `quant_policy=0` keeps the
cache in the model's dtype, with no scales (`KVCache` with the last two fields None, or a plain `(k, v)` tuple).

The torch attention backend quantizes and dequantizes with the functions here; the Triton kernels do the same in
their tiles (`kernels/kv_cache.py`, `rotary.py`, `decode_attention.py`, `prefill_attention.py`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

QUANT_POLICIES = (0, 4, 8)
LEVELS = {8: 255, 4: 15}


class KVCache(NamedTuple):
    """One layer's paged cache (a tuple, so `cache[0]`, `cache[1]` are K and V whatever the policy)."""

    k: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim] model dtype, or uint8 [..., packed_dim]
    v: torch.Tensor
    k_scales_zeros: torch.Tensor | None = None  # [num_blocks, block_size, num_kv_heads, 2] (scale, zero)
    v_scales_zeros: torch.Tensor | None = None


def check_quant_policy(quant_policy: int, name: str = "quant_policy") -> int:
    """`quant_policy` if it is 0, 4 or 8, else a ValueError naming `name`."""
    if isinstance(quant_policy, bool) or quant_policy not in QUANT_POLICIES:
        raise ValueError(f"{name} must be 0 (off), 4 (int4) or 8 (int8), got {quant_policy!r}")
    return int(quant_policy)


def packed_dim(head_dim: int, quant_policy: int) -> int:
    """Cache elements per (token, kv head): head_dim, or head_dim / 2 bytes for int4."""
    if quant_policy == 4:
        if head_dim % 2:
            raise ValueError(f"quant_policy 4 packs two features per byte: head_dim {head_dim} must be even")
        return head_dim // 2
    return head_dim


def scales_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the scales and zeros for a model computing in `dtype` (see the module docstring)."""
    return torch.float32 if dtype == torch.float32 else torch.float16


def kv_dtype_name(quant_policy: int, dtype: torch.dtype) -> str:
    """What the start-up line calls the cache's element type."""
    if quant_policy == 0:
        return str(dtype).removeprefix("torch.")
    scales = str(scales_dtype(dtype)).removeprefix("torch.")
    return f"int{quant_policy} (per-token, per-head {scales} scales and zeros)"


def bytes_per_token(num_kv_heads: int, head_dim: int, quant_policy: int, dtype: torch.dtype) -> int:
    """Bytes one token's K and V take in one layer's cache, scales and zeros included."""
    if quant_policy == 0:
        return 2 * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()
    scale_bytes = 2 * torch.tensor([], dtype=scales_dtype(dtype)).element_size()
    return 2 * num_kv_heads * (packed_dim(head_dim, quant_policy) + scale_bytes)


def allocate_kv_cache(
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    quant_policy: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> KVCache:
    """One layer's zeroed cache (zeros dequantize to zeros: the torch backend reads whole blocks, and 0 * NaN would
    be NaN)."""
    if quant_policy == 0:
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        return KVCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
    shape = (num_blocks, block_size, num_kv_heads, packed_dim(head_dim, quant_policy))
    params = (num_blocks, block_size, num_kv_heads, 2)
    sz_dtype = scales_dtype(dtype)
    return KVCache(
        torch.zeros(shape, dtype=torch.uint8, device=device),
        torch.zeros(shape, dtype=torch.uint8, device=device),
        torch.zeros(params, dtype=sz_dtype, device=device),
        torch.zeros(params, dtype=sz_dtype, device=device),
    )


def cache_quant_policy(cache: torch.Tensor, scales_zeros: torch.Tensor | None, head_dim: int) -> int:
    """The policy a cache tensor was allocated with, from its shape: 0 without scales, else 8 or 4. Raises
    ValueError when the cache cannot hold features of `head_dim`."""
    if scales_zeros is None:
        if cache.dtype == torch.uint8:
            raise ValueError("a uint8 KV cache needs its scales_zeros tensor")
        return 0
    if cache.dtype != torch.uint8:
        raise ValueError(f"a quantized KV cache must be uint8, got {cache.dtype}")
    if scales_zeros.shape != (*cache.shape[:3], 2) or scales_zeros.stride(3) != 1:
        raise ValueError(f"scales_zeros {tuple(scales_zeros.shape)} does not fit a cache of {tuple(cache.shape)}")
    if cache.shape[3] == head_dim:
        return 8
    if 2 * cache.shape[3] == head_dim:
        return 4
    raise ValueError(f"a uint8 cache of {cache.shape[3]} bytes per head holds no head_dim {head_dim}")


def quantize_kv(
    x: torch.Tensor, quant_policy: int, sz_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:  # ([..., packed_dim] uint8, [..., 2] sz_dtype)
    """Quantize x [..., head_dim] along its last dimension: the cache bytes and the (scale, zero) of each row."""
    levels = LEVELS[quant_policy]
    x = x.float()
    low, high = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    # Rounded to their stored dtype first: the codes are computed against what dequantization will use.
    scale = ((high - low) / levels).to(sz_dtype).float()
    zero = low.to(sz_dtype).float()
    inverse = torch.where(scale > 0, 1.0 / scale, 0.0)  # a constant row: every code 0, dequantized to `zero`
    codes = torch.floor((x - zero) * inverse + 0.5).clamp_(0, levels).to(torch.uint8)
    if quant_policy == 4:
        half = codes.shape[-1] // 2
        codes = codes[..., :half] | (codes[..., half:] << 4)
    return codes, torch.cat((scale, zero), dim=-1).to(sz_dtype)


def dequantize_kv(
    codes: torch.Tensor,  # [..., packed_dim] uint8
    scales_zeros: torch.Tensor,  # [..., 2]
    quant_policy: int,
    dtype: torch.dtype,
) -> torch.Tensor:  # [..., head_dim] in dtype
    """The values `quantize_kv` encoded: code * scale + zero, in float32 and then `dtype`."""
    if quant_policy == 4:
        codes = torch.cat((codes & 15, codes >> 4), dim=-1)
    scales_zeros = scales_zeros.float()
    return (codes.float() * scales_zeros[..., :1] + scales_zeros[..., 1:]).to(dtype)
