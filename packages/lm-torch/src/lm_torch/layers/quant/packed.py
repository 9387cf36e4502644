"""Reading packed int32 words, and what quantized parameters tell the weight loader.

Fused projections (q/k/v into qkv_proj, gate/up into gate_up_proj) are assembled from per-projection checkpoint
tensors along the output-channel axis. For a dense weight that is dimension 0; quantized layouts put output
channels elsewhere and may pack several into one int32. Each quantized parameter carries:
    output_dim:  the dimension indexing output channels, or None for a tensor every shard shares (GPTQ's g_idx);
    output_pack: how many output channels one element holds along output_dim (8 for 4-bit packed columns);
    optional_in_checkpoint: absent from some checkpoints, with a correct default (GPTQ's g_idx);
    input_dim:   the dimension indexing input channels (a row-parallel layer splits it over the tensor-parallel
                 ranks), or None for a tensor every rank holds whole.
"""

from __future__ import annotations

import torch
from torch import nn


def quant_param(
    tensor: torch.Tensor,
    output_dim: int | None,
    output_pack: int = 1,
    optional: bool = False,
    input_dim: int | None = None,
):
    """A frozen nn.Parameter carrying the loader attributes above."""
    param = nn.Parameter(tensor, requires_grad=False)
    # Plain instance attributes, which torch's Parameter type does not declare.
    vars(param).update(
        output_dim=output_dim, output_pack=output_pack, optional_in_checkpoint=optional, input_dim=input_dim
    )
    return param


def unpack_int32(words: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """[..., m] int32 words -> [..., m * 32 / bits] int32 values in [0, 2^bits).

    Value k of word j sits in bit field order.index(k) (fields counted from the least significant bits); `order`
    None is the plain order, AutoAWQ uses (0, 2, 4, 6, 1, 3, 5, 7).
    """
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int32) * bits
    fields = (words[..., None] >> shifts) & ((1 << bits) - 1)  # arithmetic shift, then masked: sign-safe
    if order is not None:
        fields = fields[..., [order.index(k) for k in range(per_word)]]
    return fields.reshape(*words.shape[:-1], words.shape[-1] * per_word)
