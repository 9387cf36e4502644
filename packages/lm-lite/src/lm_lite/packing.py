"""The packed int32 layouts of AutoAWQ (GEMM) and GPTQ checkpoints, written and read back.

AutoAWQ GEMM (`quant_method: awq, version: gemm`, 4-bit only), for a linear [out, in] with groups of g inputs:
    qweight [in, out / 8] int32: word (i, j) holds the integers of row i of W^T at columns 8j + AWQ_ORDER[k] in its
        nibble k (bits 4k..4k+3), so the interleaved order [0, 2, 4, 6, 1, 3, 5, 7] is stored;
    qzeros  [in / g, out / 8] int32: the zero points, packed the same way along the output dimension;
    scales  [in / g, out] float16;   W[o, i] = (q - zero) * scale with the parameters of group i // g.
GPTQ (`quant_method: gptq`, AutoGPTQ/GPTQModel's `checkpoint_format: gptq`, bits 2, 4 or 8):
    qweight [in * bits / 32, out] int32: packed along the input dimension in order, word (i, o) holding inputs
        (32 / bits) * i + k in field k;
    qzeros  [num_groups, out * bits / 32] int32: zero points minus one (the format's historical offset), packed
        along the output dimension in order;
    scales  [num_groups, out] float16;  g_idx [in] int32: the group of each input (permuted by act-order).
"""

from __future__ import annotations

import torch

from lm_lite.quant_math import QuantizedWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_rows(values: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Pack the last dimension: [..., n] integers < 2^bits -> [..., n * bits / 32] int32, field k of word j holding
    value (32 / bits) * j + order[k]."""
    per_word = 32 // bits
    order = order or tuple(range(per_word))
    *lead, n = values.shape
    if n % per_word:
        raise ValueError(f"cannot pack {n} values of {bits} bits into int32 words")
    grouped = values.to(torch.int64).reshape(*lead, n // per_word, per_word)[..., list(order)]
    shifts = torch.arange(per_word, device=values.device, dtype=torch.int64) * bits
    words = (grouped << shifts).sum(dim=-1)  # < 2^32: the fields do not overlap
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_rows(words: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """The inverse of `pack_rows`: [..., m] int32 -> [..., m * 32 / bits] int32 in [0, 2^bits)."""
    per_word = 32 // bits
    order = order or tuple(range(per_word))
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int32) * bits
    fields = (words.to(torch.int32)[..., None] >> shifts) & (2**bits - 1)  # [..., m, per_word], field k
    inverse = [order.index(k) for k in range(per_word)]  # value k of a word sits in field inverse[k]
    return fields[..., inverse].reshape(*words.shape[:-1], -1)


# -- AutoAWQ GEMM ---------------------------------------------------------------------------------------------------


def pack_awq(q: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The AutoAWQ GEMM tensors of one linear (names relative to the module)."""
    if q.bits != 4 or q.g_idx is not None:
        raise ValueError("the AutoAWQ GEMM layout holds 4-bit weights with contiguous groups only")
    tensors = {
        "qweight": pack_rows(q.qweight.t(), 4, AWQ_ORDER),  # [in, out / 8]
        "qzeros": pack_rows(q.zeros.t(), 4, AWQ_ORDER),  # [groups, out / 8]
        "scales": q.scales.t().contiguous().half(),  # [groups, out]
    }
    if q.bias is not None:
        tensors["bias"] = q.bias.half()
    return tensors


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dequantized W [out, in] float32 from AutoAWQ GEMM tensors."""
    q = unpack_rows(qweight, 4, AWQ_ORDER)  # [in, out]
    zeros = unpack_rows(qzeros, 4, AWQ_ORDER)  # [groups, out]
    groups = torch.arange(q.shape[0], device=q.device) // (q.shape[0] if group_size == -1 else group_size)
    return ((q - zeros[groups]).float() * scales.float()[groups]).t()


# -- GPTQ -----------------------------------------------------------------------------------------------------------


def pack_gptq(q: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The GPTQ (v1 checkpoint format) tensors of one linear (names relative to the module)."""
    if q.bits not in (2, 4, 8):
        raise ValueError(f"GPTQ packing supports 2, 4 and 8 bits, not {q.bits}")
    if (q.zeros < 1).any():
        # Loaders read stored + 1 without wrapping, so a zero point of 0 would come back as 2^bits.
        raise ValueError("the GPTQ v1 layout cannot store a zero point of 0")
    tensors = {
        "qweight": pack_rows(q.qweight, q.bits).t().contiguous(),  # [out, in * bits / 32] -> [in * bits / 32, out]
        # The v1 format stores zero - 1; every GPTQ loader adds the 1 back.
        "qzeros": pack_rows((q.zeros - 1).t(), q.bits),  # [groups, out * bits / 32]
        "scales": q.scales.t().contiguous().half(),
        "g_idx": q.group_index().to(torch.int32),
    }
    if q.bias is not None:
        tensors["bias"] = q.bias.half()
    return tensors


def unpack_gptq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int
) -> torch.Tensor:
    """Dequantized W [out, in] float32 from GPTQ v1 tensors."""
    q = unpack_rows(qweight.t(), bits).t()  # [in, out]
    zeros = unpack_rows(qzeros, bits) + 1  # [groups, out]; undo the stored offset
    groups = g_idx.long()
    return ((q - zeros[groups]).float() * scales.float()[groups]).t()
