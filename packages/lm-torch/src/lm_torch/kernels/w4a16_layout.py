"""The packed int4 layout of the W4A16 kernels (`lm_torch.kernels.w4a16`, `lm_torch.kernels.w4a16_tc`): AWQ and GPTQ
checkpoints are repacked into it once (`layers.quant.weight_only`).

    packed [N, K / 8] int32, K cut into blocks of B = min(group_size, 128) inputs, each block B / 8 words per row;
    word j of block b holds the 8 inputs b * B + t * (B / 8) + j (t = 0..7) in bits 4t .. 4t + 3;
    scales [K / group, N] and zeros [K / group, N] in the activation dtype (zeros are small integers, exact there):
    W[n, k] = (q[n, k] - zeros[k // group, n]) * scales[k // group, n].
Why the inputs of a word are B / 8 apart rather than adjacent: shifting a loaded tile of words by 4t gives "plane" t,
the weights of inputs b * B + t * (B / 8) + j for the tile's words j, which is a contiguous run of x. So each plane
meets a contiguous slice of x in the tile's own register layout (no shuffles between threads, 16-byte loads of both
operands), and a word never straddles two groups, so a block needs one scale and one zero per row.
"""

from __future__ import annotations

import torch
import triton

from lm_torch.kernels.common import check_cuda_or_interpreter

MAX_BLOCK = 128  # inputs of one interleaved block (fewer when the groups are smaller)


def block_inputs(group_size: int) -> int:
    """B, the inputs of one interleaved block of the layout, for a group size (which it must divide or equal)."""
    block = min(group_size, MAX_BLOCK)
    if block % 16 or group_size % block:
        raise ValueError(f"w4a16: group_size {group_size} must be a multiple of 16, and of 128 when larger")
    return block


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


def check_call(x, packed, scales, zeros, group_size) -> tuple[int, int, int, int]:
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


def split_blocks(num_blocks: int, step: int, split_k: int) -> tuple[int, int]:
    """(blocks per split, a multiple of the blocks a loop step takes, and the number of splits)."""
    if num_blocks % step:
        raise ValueError(f"w4a16: blocks {step} per step do not divide the {num_blocks} blocks of K")
    per_split = triton.cdiv(triton.cdiv(num_blocks, split_k), step) * step
    return per_split, triton.cdiv(num_blocks, per_split)
