"""Mixture-of-experts decoders on Llama's attention: Qwen2-MoE, Qwen3-MoE, and (`models.mixtral`) Mixtral.

Each layer is Llama's (`LlamaAttention`, pre-norms with the residual add fused into the next norm) with a
`SparseMoeBlock` (`lm_torch.layers.moe`) in place of the dense MLP where the family routes:
- Qwen3-MoE: q/k norms per head; softmax top-k, renormalised when `norm_topk_prob`;
- Qwen2-MoE: q/k/v biases (`qkv_bias`); softmax top-k (`norm_topk_prob`, False in the released models) plus a shared
  expert scaled by sigmoid(`shared_expert_gate`);
- both: layer i is sparse unless it is in `mlp_only_layers` or (i + 1) is not a multiple of `decoder_sparse_step`;
  dense layers carry Llama's MLP of `intermediate_size`.
Weights other than the MoE blocks' load through `LlamaForCausalLM.load_weights`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from lm_torch.distributed.sharding import TensorLike
from lm_torch.layers.context import BuildContext, context_or_current
from lm_torch.layers.embedding import VocabParallelEmbedding
from lm_torch.layers.moe import SparseMoeBlock
from lm_torch.layers.norm import RMSNorm
from lm_torch.layers.rotary import RotaryEmbedding
from lm_torch.models.base import CausalLM
from lm_torch.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, make_lm_head


class MoeDecoderLayer(LlamaDecoderLayer):
    """`LlamaDecoderLayer` (its forward) with the given MLP: a `SparseMoeBlock` or a dense `LlamaMLP`."""

    def __init__(
        self, config: Any, layer_idx: int, rotary: RotaryEmbedding, qk_norm: bool, mlp: nn.Module, ctx: BuildContext
    ) -> None:
        nn.Module.__init__(self)  # not LlamaDecoderLayer's: it would build a dense MLP of intermediate_size
        self.self_attn = LlamaAttention(config, layer_idx, rotary, qk_norm, ctx)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx=ctx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx=ctx)


class MoeForCausalLM(LlamaForCausalLM):
    """The shared model: subclasses say which layers are sparse, how their blocks route, and checkpoint renames."""

    #: Whether attention normalises q and k per head (Qwen3).
    qk_norm: bool = False

    def __init__(self, config: Any, max_positions: int, ctx: BuildContext | None = None) -> None:
        ctx = context_or_current(ctx)
        CausalLM.__init__(self, config, ctx)  # Llama's modules are not built; its forward and loading are inherited
        rotary = RotaryEmbedding(config, max_positions, ctx=ctx)
        attention_config = self.attention_config(config)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx)
        self.layers = nn.ModuleList(
            MoeDecoderLayer(attention_config, i, rotary, self.qk_norm, self.make_mlp(config, i, ctx), ctx)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx=ctx)
        self.lm_head = make_lm_head(config, ctx)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.embed_tokens.weight

    def attention_config(self, config: Any) -> Any:
        """The config `LlamaAttention` reads (the model's own unless a family needs another view of it)."""
        return config

    def make_mlp(self, config: Any, layer_idx: int, ctx: BuildContext) -> nn.Module:
        """Layer `layer_idx`'s MLP: Qwen's rule (`mlp_only_layers`, `decoder_sparse_step`) between sparse and dense."""
        step = getattr(config, "decoder_sparse_step", 1) or 1
        sparse = config.num_experts > 0 and (layer_idx + 1) % step == 0
        if not sparse or layer_idx in (getattr(config, "mlp_only_layers", None) or []):
            return LlamaMLP(config, layer_idx, ctx)
        return SparseMoeBlock(
            config.hidden_size,
            config.num_experts,
            config.num_experts_per_tok,
            config.moe_intermediate_size,
            bool(config.norm_topk_prob),
            config.hidden_act,
            layer_idx,
            ctx,
            round_weights=True,  # transformers' Qwen routers cast the weights to the model's dtype
            shared_intermediate=self.shared_expert_size(config),
        )

    def shared_expert_size(self, config: Any) -> int:
        """Intermediate size of each sparse layer's shared expert (0: none)."""
        return 0

    def checkpoint_name(self, name: str) -> str:
        """A checkpoint tensor's name as our modules name it (without the "model." prefix)."""
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The MoE blocks' tensors into their stacks, every other tensor through Llama's loading; returns the names
        of the parameters loaded (a stack once all of its experts are in)."""
        loaded: set[str] = set()

        def dense(pairs: Iterable[tuple[str, TensorLike]]) -> Iterator[tuple[str, TensorLike]]:
            for name, tensor in pairs:
                name = self.checkpoint_name(name.removeprefix("model."))
                parts = name.split(".", 3)
                if len(parts) == 4 and parts[0] == "layers" and parts[2] == "mlp":
                    block = self.layers[int(parts[1])].mlp
                    if isinstance(block, SparseMoeBlock):
                        prefix = f"layers.{parts[1]}.mlp."
                        loaded.update(prefix + n for n in block.load_weight(parts[3], tensor))
                        continue
                yield name, tensor

        llama_loaded = super().load_weights(dense(weights))  # type: ignore[arg-type]  # lazy tensors pass through
        return loaded | llama_loaded


class Qwen3MoeForCausalLM(MoeForCausalLM):
    """Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): q/k norms, softmax top-k routing, no shared expert."""

    qk_norm = True


class Qwen2MoeForCausalLM(MoeForCausalLM):
    """Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): q/k/v biases, routed experts plus a gated shared expert."""

    def attention_config(self, config: Any) -> Any:
        """The config as `LlamaAttention` reads Qwen2's layout: biases on q/k/v (`qkv_bias`), none on o_proj."""
        return _Qwen2AttentionConfig(config)

    def shared_expert_size(self, config: Any) -> int:
        """`shared_expert_intermediate_size`."""
        return int(getattr(config, "shared_expert_intermediate_size", 0) or 0)


class _Qwen2AttentionConfig:
    """A Qwen2-MoE config seen as a Qwen2 one (model_type "qwen2" when `qkv_bias`), which `LlamaAttention` gives
    q/k/v biases and the sliding-window rule of; every other attribute is the config's."""

    def __init__(self, config: Any) -> None:
        self._config = config
        self.model_type = "qwen2" if getattr(config, "qkv_bias", True) else config.model_type

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)
