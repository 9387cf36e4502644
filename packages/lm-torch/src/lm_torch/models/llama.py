"""The Llama family: Llama (1-3.x, with Llama-3 rope scaling), Mistral, Qwen2 (qkv bias) and Qwen3 (q/k norms).

One decoder serves them all; the differences are flags read from the transformers config.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn

from lm_torch.distributed.sharding import TensorLike, divide, read_range
from lm_torch.layers.activation import GatedActivation, gated_projection
from lm_torch.layers.attention import AttentionState, PagedAttention
from lm_torch.layers.context import BuildContext, context_or_current
from lm_torch.layers.embedding import VocabParallelEmbedding, vocab_shard_size
from lm_torch.layers.linear import make_linear
from lm_torch.layers.norm import RMSNorm
from lm_torch.layers.rotary import RotaryEmbedding
from lm_torch.models.base import CausalLM, load_fused, output_layout

KVCache = tuple[torch.Tensor, ...]
# Qwen2 and the Qwen2-VL language models: q, k and v projections with biases, sliding window only when asked.
QKV_BIAS_MODEL_TYPES = ("qwen2", "qwen2_vl_text", "qwen2_5_vl_text")


class LlamaAttention(nn.Module):
    """q, k, v in one projection, optional per-head q/k norms (Qwen3), paged attention, the output projection."""

    def __init__(
        self, config: Any, layer_idx: int, rotary: RotaryEmbedding, qk_norm: bool, ctx: BuildContext | None = None
    ) -> None:
        super().__init__()
        ctx = context_or_current(ctx)
        hidden = config.hidden_size
        self.tp = ctx.tp
        self.total_num_heads = config.num_attention_heads
        self.total_num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // self.total_num_heads
        # This rank's heads (all of them at tp 1); KV heads are replicated when there are fewer than ranks.
        self.num_heads = divide(self.total_num_heads, self.tp.size, "num_attention_heads")
        self.num_kv_heads = kv_heads_per_rank(self.total_num_kv_heads, self.tp.size)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = bool(getattr(config, "attention_bias", False) or config.model_type in QKV_BIAS_MODEL_TYPES)
        # q, k and v in one matmul: [q | k | v] rows (column-parallel: this rank's heads of each).
        prefix = f"{layer_idx}.self_attn"
        self.qkv_proj = make_linear(
            ctx, hidden, self.q_size + 2 * self.kv_size, bias, f"{prefix}.qkv_proj", shard="column"
        )
        o_bias = bool(getattr(config, "attention_bias", False))
        # Row-parallel: each rank's heads give a partial sum of the output, all-reduced in `forward`.
        self.o_proj = make_linear(ctx, self.q_size, hidden, o_bias, f"{prefix}.o_proj", shard="row")
        self.rotary = rotary
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, ctx=ctx) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, ctx=ctx) if qk_norm else None
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None and layer_types[layer_idx] != "sliding_attention":
            window = None
        if config.model_type in QKV_BIAS_MODEL_TYPES and not getattr(config, "use_sliding_window", False):
            window = None
        self.attn = PagedAttention(
            self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, window, ctx=ctx
        )

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, kv_cache: KVCache, attn: AttentionState
    ) -> torch.Tensor:  # [num_tokens, hidden]
        """x: [num_tokens, hidden], positions: [num_tokens]."""
        if self.q_norm is None:
            # One token of a W4A16 model on CUDA: the projection's kernel also rotates and stores k and v.
            qkv = self.attn.project_rotate_store(self.qkv_proj, x, self.rotary, positions, kv_cache, attn)
            if qkv is not None:
                q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
                return self.tp.all_reduce(self.o_proj(self.attn(q, k, v, kv_cache, attn, kv_stored=True)))
        qkv = self.qkv_proj(x)  # [num_tokens, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            assert self.k_norm is not None  # q_norm and k_norm are built together
            q, k = self.q_norm(q), self.k_norm(k)
        # The attention layer applies the rotary embedding (fused with the KV-cache write on CUDA).
        out = self.o_proj(self.attn(q.flatten(1), k.flatten(1), v, kv_cache, attn, self.rotary, positions))
        return self.tp.all_reduce(out)


class LlamaMLP(nn.Module):
    """down(act(gate(x)) * up(x)), gate and up in one [gate | up] projection."""

    def __init__(self, config: Any, layer_idx: int = 0, ctx: BuildContext | None = None) -> None:
        super().__init__()
        ctx = context_or_current(ctx)
        self.tp = ctx.tp
        bias = bool(getattr(config, "mlp_bias", False))
        hidden = config.hidden_size
        intermediate = divide(config.intermediate_size, self.tp.size, "intermediate_size")  # this rank's share
        self.gate_up_proj = make_linear(
            ctx, hidden, 2 * intermediate, bias, f"{layer_idx}.mlp.gate_up_proj", shard="column"
        )
        self.down_proj = make_linear(ctx, intermediate, hidden, bias, f"{layer_idx}.mlp.down_proj", shard="row")
        self.act_fn = GatedActivation(config.hidden_act, ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, hidden] -> [num_tokens, hidden]."""
        return self.tp.all_reduce(self.down_proj(gated_projection(self.gate_up_proj, x, self.act_fn)))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP, the residual add fused into the next norm."""

    def __init__(
        self, config: Any, layer_idx: int, rotary: RotaryEmbedding, qk_norm: bool, ctx: BuildContext | None = None
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, rotary, qk_norm, ctx)
        self.mlp = LlamaMLP(config, layer_idx, ctx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx=ctx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx=ctx)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: KVCache,
        attn: AttentionState,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden, residual: [num_tokens, hidden] (residual None in the first layer)."""
        hidden, residual = self.input_layernorm.pre_norm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, attn)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaForCausalLM(CausalLM):
    """Also MistralForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM."""

    def __init__(self, config: Any, max_positions: int, ctx: BuildContext | None = None) -> None:
        ctx = context_or_current(ctx)
        super().__init__(config, ctx)
        qk_norm = config.model_type.startswith("qwen3")
        rotary = RotaryEmbedding(config, max_positions, ctx=ctx)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, rotary, qk_norm, ctx) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx=ctx)
        self.lm_head = make_lm_head(config, ctx)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        attn: AttentionState,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [num_tokens, hidden]
        """input_ids, positions: [num_tokens] (positions [3, num_tokens] under M-RoPE); `attn` the attention
        backend's per-step state; `inputs_embeds` ([num_tokens, hidden]) replaces the token embeddings (a
        vision-language model's, with image features at the placeholders)."""
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, attn)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors in, q/k/v and gate/up into their fused projections; returns the names loaded."""
        fused = {
            "q_proj": ("qkv_proj", 0),
            "k_proj": ("qkv_proj", 1),
            "v_proj": ("qkv_proj", 2),
            "gate_proj": ("gate_up_proj", 0),
            "up_proj": ("gate_up_proj", 1),
        }
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and getattr(self.config, "tie_word_embeddings", False):
                continue
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in fused:
                target, shard = fused[parts[-2]]
                fused_name = ".".join([*parts[:-2], target, parts[-1]])
                load_fused(params[fused_name], tensor, shard, self._shard_sizes(target), self.tp, fused_name)
                loaded.add(fused_name)
                continue
            if len(parts) >= 2 and parts[-2] in ("qkv_proj", "gate_up_proj") and self.tp.size > 1:
                self._load_prefused(params[name], tensor, parts[-2], name)  # Phi-3 stores them fused
                loaded.add(name)
                continue
            self.copy_weight(params, name, tensor)
            loaded.add(name)
        return loaded

    def _shard_sizes(self, target: str) -> list[int]:
        """Output channels of each part of a fused projection on this rank."""
        attn = cast(LlamaAttention, self.layers[0].self_attn)  # nn.ModuleList items are typed nn.Module
        if target == "qkv_proj":
            return [attn.q_size, attn.kv_size, attn.kv_size]
        return [divide(self.config.intermediate_size, self.tp.size, "intermediate_size")] * 2

    def _checkpoint_sizes(self, target: str) -> list[int]:
        """Output channels of each part of a fused projection in the checkpoint (every rank's)."""
        attn = cast(LlamaAttention, self.layers[0].self_attn)
        if target == "qkv_proj":
            kv = attn.total_num_kv_heads * attn.head_dim
            return [attn.total_num_heads * attn.head_dim, kv, kv]
        return [self.config.intermediate_size] * 2

    def _load_prefused(self, param: nn.Parameter, tensor: TensorLike, target: str, name: str) -> None:
        """A checkpoint tensor holding every part of a fused projection, split into its parts, each loaded as the
        rank's share (`load_fused`): under tensor parallelism a rank holds a piece of each part, not one range."""
        dim, pack = output_layout(param)
        sizes = self._shard_sizes(target)
        if dim is None:  # a tensor every part shares (GPTQ's g_idx)
            for shard in range(len(sizes)):
                load_fused(param, tensor, shard, sizes, self.tp, name)
            return
        start = 0
        for shard, total in enumerate(self._checkpoint_sizes(target)):
            part = read_range(tensor, dim, start // pack, total // pack)
            load_fused(param, part, shard, sizes, self.tp, name)
            start += total


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    """KV heads each tensor-parallel rank holds: a share when they divide among the ranks, else one, replicated over
    tp / num_kv_heads ranks (which must then be whole)."""
    if num_kv_heads >= tp_size:
        return divide(num_kv_heads, tp_size, "num_key_value_heads")
    if tp_size % num_kv_heads:
        raise ValueError(
            f"tensor parallel size (tp) {tp_size} is neither a divisor nor a multiple of num_key_value_heads "
            f"({num_kv_heads})"
        )
    return 1


def make_lm_head(config: Any, ctx: BuildContext):
    """The LM head: this rank's share of the vocabulary (padded like the embedding's), gathered in
    `CausalLM.compute_logits`."""
    rows = vocab_shard_size(config.vocab_size, ctx.tp.size)
    return make_linear(ctx, config.hidden_size, rows, bias=False, shard="column", padded=True)
