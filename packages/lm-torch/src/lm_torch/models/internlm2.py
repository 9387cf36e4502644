"""InternLM2 / InternLM2.5: Llama's architecture under other tensor names, with q, k and v packed per KV head.

transformers has no InternLM2 implementation (checkpoints ship remote code), so the config arrives as whatever
object holds config.json's keys; we translate it into a `LlamaConfig` and run `LlamaForCausalLM` on it.

Checkpoint layout (model.* prefix):
    tok_embeddings                 -> embed_tokens
    layers.N.attention.wqkv        -> layers.N.self_attn.qkv_proj, after regrouping (below)
    layers.N.attention.wo          -> layers.N.self_attn.o_proj
    layers.N.feed_forward.w1 / w3  -> layers.N.mlp.gate_up_proj ([gate | up] rows)
    layers.N.feed_forward.w2       -> layers.N.mlp.down_proj
    layers.N.attention_norm        -> layers.N.input_layernorm
    layers.N.ffn_norm              -> layers.N.post_attention_layernorm
    norm, output                   -> norm, lm_head
`wqkv`'s rows are grouped by KV head: [num_kv_heads, q_per_kv + 2, head_dim], each group holding that KV head's
q_per_kv query heads, then its key, then its value. Query head h * q_per_kv + j is row block (h, j), the order
Llama's GQA assumes (query head i reads KV head i // q_per_kv), so regrouping to [q | k | v] keeps head identities.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch

from lm_torch.distributed.sharding import materialize
from lm_torch.layers.context import BuildContext
from lm_torch.models.base import output_layout
from lm_torch.models.llama import LlamaAttention, LlamaForCausalLM

_RENAMES = {
    "tok_embeddings": "embed_tokens",
    "attention.wo": "self_attn.o_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "feed_forward.w1": "mlp.gate_proj",  # gate/up/down: Llama's names, which LlamaForCausalLM fuses on load
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
}


def llama_config_from_internlm2(config):
    """A transformers LlamaConfig equivalent to an InternLM2 config (remote-code class or plain key holder)."""
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": float(getattr(config, "rope_theta", 10000.0))}
    scaling = getattr(config, "rope_scaling", None)
    if scaling:
        # InternLM2 names the type "type" and knows "linear" and "dynamic" (NTK), as transformers does.
        rope.update({k: v for k, v in scaling.items() if k not in ("type", "rope_type")})
        rope["rope_type"] = scaling.get("rope_type") or scaling["type"]
    bias = bool(getattr(config, "bias", False))
    llama = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        hidden_act=getattr(config, "hidden_act", "silu"),
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        rope_parameters=rope,
        attention_bias=bias,  # InternLM2's `bias` covers wqkv and wo, as attention_bias covers Llama's projections
        mlp_bias=False,
    )
    llama.architectures = list(getattr(config, "architectures", None) or ["InternLM2ForCausalLM"])
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(config, key, None) is not None:
            setattr(llama, key, getattr(config, key))
    return llama


class InternLM2ForCausalLM(LlamaForCausalLM):
    """`self.config` is the translated LlamaConfig; `self.internlm2_config` the one the checkpoint came with."""

    def __init__(self, config: Any, max_positions: int, ctx: BuildContext | None = None) -> None:
        super().__init__(llama_config_from_internlm2(config), max_positions, ctx)
        self.internlm2_config = config

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Llama's loading, after renaming InternLM2's tensors and splitting its packed wqkv."""
        return super().load_weights(self._llama_weights(weights))

    def _llama_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            if name == "output.weight":
                yield "lm_head.weight", tensor
                continue
            if ".attention.wqkv." in name:
                yield from self._split_wqkv(name, tensor)
                continue
            for old, new in _RENAMES.items():
                if f".{old}." in name:
                    name = name.replace(f".{old}.", f".{new}.")
                    break
            yield name, tensor

    def _split_wqkv(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        """wqkv weight [num_kv * (q_per_kv + 2) * head_dim, hidden] (or bias, no hidden) -> q_proj, k_proj, v_proj.

        Quantized tensors hold output channels along another dimension, maybe packed (`output_layout`); tensors
        without output channels (GPTQ's g_idx) go to all three.
        """
        attn = cast(LlamaAttention, self.layers[0].self_attn)  # nn.ModuleList items are typed nn.Module
        # The checkpoint's heads, all of them: under tensor parallelism `load_fused` then takes this rank's.
        num_kv, head_dim = attn.total_num_kv_heads, attn.head_dim
        q_per_kv = attn.total_num_heads // num_kv
        prefix = name.replace(".attention.wqkv.", ".self_attn.")  # model.layers.N.self_attn.weight
        base, _, param = prefix.rpartition(".")
        fused = self.get_parameter(f"{base.removeprefix('model.')}.qkv_proj.{param}")
        dim, pack = output_layout(fused)
        if dim is None:
            for proj in ("q_proj", "k_proj", "v_proj"):
                yield f"{base}.{proj}.{param}", tensor
            return
        rows = materialize(tensor).movedim(dim, 0)
        rest = rows.shape[1:]
        grouped = rows.reshape(num_kv, q_per_kv + 2, head_dim // pack, *rest)
        q = grouped[:, :q_per_kv].reshape(-1, *rest)  # heads h*q_per_kv + j
        k = grouped[:, q_per_kv].reshape(-1, *rest)
        v = grouped[:, q_per_kv + 1].reshape(-1, *rest)
        for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
            yield f"{base}.{proj}.{param}", part.movedim(0, dim)
