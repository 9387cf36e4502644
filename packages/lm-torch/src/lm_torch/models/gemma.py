"""The Gemma family: Gemma, Gemma 2 and Gemma 3 (its language model, text-only or from the multimodal checkpoint).

What sets them apart from Llama, all read from the transformers config:
- RMSNorm weights are stored as `w - 1` and applied in float32 (`RMSNorm(offset=1.0)`);
- embeddings are multiplied by sqrt(hidden_size), rounded to the weights' dtype first as transformers does;
- Gemma 2/3 wrap both the attention and the MLP in a pre- and a post-norm ("sandwich" norms), scale the attention
  scores by `query_pre_attn_scalar ** -0.5` and alternate sliding-window and global layers (`config.layer_types`);
- Gemma 2 soft-caps the attention scores (`attn_logit_softcapping`) and the logits (`final_logit_softcapping`,
  which `CausalLM.compute_logits` applies);
- Gemma 3 normalises q and k per head and gives local and global layers their own rope (`rope_parameters` keyed by
  layer type).
Checkpoint names are Llama's, so weight loading is inherited from `LlamaForCausalLM`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lm_torch.distributed.sharding import divide
from lm_torch.layers.activation import GatedActivation, gated_projection
from lm_torch.layers.attention import AttentionState, PagedAttention
from lm_torch.layers.context import BuildContext, context_or_current
from lm_torch.layers.embedding import VocabParallelEmbedding
from lm_torch.layers.linear import make_linear
from lm_torch.layers.norm import RMSNorm
from lm_torch.layers.rotary import RotaryEmbedding
from lm_torch.models.base import CausalLM
from lm_torch.models.llama import LlamaAttention, LlamaForCausalLM, make_lm_head

KVCache = tuple[torch.Tensor, ...]

# Parts of a Gemma 3 multimodal checkpoint that are not the language model.
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
# Where the multimodal checkpoint keeps the language model: the original layout, then transformers 5's in-memory one.
_LANGUAGE_MODEL_PREFIXES = ("language_model.model.", "model.language_model.")


class GemmaAttention(LlamaAttention):
    """Llama's attention with Gemma's score scale, soft-capping (Gemma 2) and offset q/k norms (Gemma 3)."""

    def __init__(self, config: Any, layer_idx: int, rotary: RotaryEmbedding, ctx: BuildContext | None = None) -> None:
        ctx = context_or_current(ctx)
        qk_norm = config.model_type.startswith("gemma3")
        super().__init__(config, layer_idx, rotary, qk_norm, ctx)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, offset=1.0, ctx=ctx)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, offset=1.0, ctx=ctx)
        # Gemma 1 has no query_pre_attn_scalar and scales by head_dim like Llama.
        scalar = getattr(config, "query_pre_attn_scalar", None) or self.head_dim
        # transformers passes the soft-cap to attention for Gemma 2 only; Gemma 3 configs may still carry the key.
        softcap = getattr(config, "attn_logit_softcapping", None) if config.model_type == "gemma2" else None
        self.attn = PagedAttention(
            self.num_heads, self.num_kv_heads, self.head_dim, scalar**-0.5, self.attn.sliding_window, softcap, ctx
        )


class GemmaMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with Gemma's activation key."""

    def __init__(self, config: Any, layer_idx: int = 0, ctx: BuildContext | None = None) -> None:
        super().__init__()
        ctx = context_or_current(ctx)
        self.tp = ctx.tp
        hidden = config.hidden_size
        intermediate = divide(config.intermediate_size, self.tp.size, "intermediate_size")  # this rank's share
        self.gate_up_proj = make_linear(
            ctx, hidden, 2 * intermediate, False, f"{layer_idx}.mlp.gate_up_proj", shard="column"
        )
        self.down_proj = make_linear(ctx, intermediate, hidden, False, f"{layer_idx}.mlp.down_proj", shard="row")
        # Gemma 1 names its activation hidden_act, Gemma 2/3 hidden_activation: the keys transformers reads.
        act = config.hidden_act if config.model_type == "gemma" else config.hidden_activation
        self.act_fn = GatedActivation(act, ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, hidden] -> [num_tokens, hidden]."""
        return self.tp.all_reduce(self.down_proj(gated_projection(self.gate_up_proj, x, self.act_fn)))


class GemmaDecoderLayer(nn.Module):
    """Gemma's decoder layer: pre-norms, and in Gemma 2/3 post-norms around attention and MLP too."""

    def __init__(self, config: Any, layer_idx: int, rotary: RotaryEmbedding, ctx: BuildContext | None = None) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = GemmaAttention(config, layer_idx, rotary, ctx)
        self.mlp = GemmaMLP(config, layer_idx, ctx)
        self.input_layernorm = RMSNorm(config.hidden_size, eps, offset=1.0, ctx=ctx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, offset=1.0, ctx=ctx)
        self.sandwich = config.model_type != "gemma"
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps, offset=1.0, ctx=ctx)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps, offset=1.0, ctx=ctx)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: KVCache,
        attn: AttentionState,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden, residual: [num_tokens, hidden]; the residual add is fused into the next norm, as in Llama."""
        hidden, residual = self.input_layernorm.pre_norm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, attn)
        if not self.sandwich:
            hidden, residual = self.post_attention_layernorm(hidden, residual)
            return self.mlp(hidden), residual
        # Gemma 2/3: residual + post_norm(attn), then the MLP between its own pre- and post-norm.
        hidden = self.post_attention_layernorm(hidden)
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class GemmaForCausalLM(LlamaForCausalLM):
    """Also Gemma2ForCausalLM, Gemma3ForCausalLM, and the language model of Gemma3ForConditionalGeneration
    (`models.gemma3_vl`)."""

    def __init__(self, config: Any, max_positions: int, ctx: BuildContext | None = None) -> None:
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("Gemma 3 with use_bidirectional_attention (an embedding model) is not a causal LM")
        # Builds its own modules (not Llama's); LlamaForCausalLM contributes weight loading only.
        ctx = context_or_current(ctx)
        CausalLM.__init__(self, config, ctx)
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        rope_parameters = getattr(config, "rope_parameters", None) or {}
        # Gemma 3 keys rope_parameters by layer type (local layers rope_theta 10k, global ones 1M and maybe scaled);
        # Gemma 1/2 have one flat set for all layers.
        per_type = all(t in rope_parameters for t in set(layer_types))
        rotaries = {
            t: RotaryEmbedding(config, max_positions, t if per_type else None, ctx) for t in dict.fromkeys(layer_types)
        }
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx)
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(config, i, rotaries[layer_types[i]], ctx) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset=1.0, ctx=ctx)
        self.lm_head = make_lm_head(config, ctx)
        if getattr(config, "tie_word_embeddings", True):
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        attn: AttentionState,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [num_tokens, hidden]
        """input_ids, positions: [num_tokens]; `attn` the attention backend's per-step state; `inputs_embeds`
        ([num_tokens, hidden], already scaled as `embed_input_ids` scales) replaces the token embeddings."""
        hidden = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, attn)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:  # [num_tokens, hidden]
        """Token embeddings times sqrt(hidden_size), what the first layer takes."""
        hidden = self.embed_tokens(input_ids)
        # transformers keeps sqrt(hidden) as a float32 tensor and casts it to the weights' dtype before multiplying
        # (sqrt(3072) = 55.43 becomes 55.5 in bfloat16); we round the same way.
        normalizer = torch.tensor(self.config.hidden_size**0.5, dtype=torch.float32).to(hidden.dtype)
        return hidden * normalizer

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Llama's loading, after dropping a multimodal checkpoint's vision tower and prefixes."""
        return super().load_weights(self._language_model_weights(weights))

    @staticmethod
    def _language_model_weights(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
        """Text checkpoints pass through; a multimodal Gemma 3 one loses its vision tower and its prefixes."""
        for name, tensor in weights:
            if name.startswith(_VISION_PREFIXES):
                continue
            for prefix in _LANGUAGE_MODEL_PREFIXES:
                if name.startswith(prefix):
                    name = "model." + name.removeprefix(prefix)
                    break
            else:
                name = name.removeprefix("language_model.")  # language_model.lm_head.weight, when untied
            yield name, tensor
