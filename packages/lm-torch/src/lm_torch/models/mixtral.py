"""Mixtral (8x7B, 8x22B): Llama's attention with a sparse MoE block in every layer.

Routing is softmax top-k renormalised over the k chosen, the weights kept in float32 as transformers keeps them. The
checkpoint names the block `block_sparse_moe` and each expert's projections w1 (gate), w3 (up) and w2 (down); we name
the block `mlp` (as transformers 5 does in memory) and hold the experts stacked (`lm_torch.layers.moe`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lm_torch.layers.context import BuildContext
from lm_torch.layers.moe import SparseMoeBlock
from lm_torch.models.qwen_moe import MoeForCausalLM


class MixtralForCausalLM(MoeForCausalLM):
    """MixtralForCausalLM: every layer sparse, `num_local_experts` experts of `intermediate_size`."""

    def make_mlp(self, config: Any, layer_idx: int, ctx: BuildContext) -> nn.Module:
        """The sparse block of every layer."""
        return SparseMoeBlock(
            config.hidden_size,
            config.num_local_experts,
            config.num_experts_per_tok,
            config.intermediate_size,
            True,
            config.hidden_act,
            layer_idx,
            ctx,
        )

    def checkpoint_name(self, name: str) -> str:
        """`block_sparse_moe` is our `mlp` (the expert projections' w1/w3/w2 names are the block's to map)."""
        return name.replace(".block_sparse_moe.", ".mlp.")
