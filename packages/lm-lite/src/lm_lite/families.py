"""What lm-lite knows about each model family: where the decoder layers are, which op feeds which linears.

AWQ and SmoothQuant move a per-input-channel scale `s` from a linear's input to the op that produces that input: the
op's output is divided by `s` and the linear's weight columns are multiplied by it, which leaves the float model's
output unchanged while reshaping what the quantizer sees. That is only possible where the producing op is linear per
channel: an RMSNorm (its weight), or a linear whose output feeds the next linear directly (v_proj -> o_proj through
attention, up_proj -> down_proj through the gated activation). `ScaleGroup` names one such pair; a family lists
its groups in the order their linears run, which is also the order GPTQ quantizes them in.

Names are those of the transformers modules inside one decoder layer. InternLM2 is converted to Llama's layout when
loaded (see `model_io`), so it shares Llama's table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ScaleGroup:
    """Linears sharing one input, and the op that produces that input.

    prev: the producing module (a norm, or a linear whose output rows feed the linears).
    linears: the linears reading that input.
    inspect: the module whose output AWQ's scale search compares ("self_attn", "mlp"); None means the one linear.
    prev_rows: for a packed producer (Phi-3's qkv_proj, gate_up_proj), which of its row blocks feeds the linears:
        "v" (the value rows of [q | k | v]) or "up" (the second half of [gate | up]).
    gqa: the producer is v (num_kv_heads * head_dim outputs) and the consumer o_proj reads num_heads * head_dim
        inputs: each value channel feeds num_heads / num_kv_heads input channels, which must share its scale.
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str | None = None
    prev_rows: str | None = None
    gqa: bool = False


@dataclass(frozen=True)
class Family:
    """One family's table. `norm_offset` is 1.0 where RMSNorm weights are stored as w - 1 (Gemma)."""

    name: str
    architectures: tuple[str, ...]
    groups: tuple[ScaleGroup, ...]
    norm_offset: float = 0.0
    # AWQ's clipping search skips these: q and k meet in a product (q k^T) whose error is hard to bound one linear
    # at a time, as AutoAWQ found.
    no_clip: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.qkv_proj")
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def linears(self) -> tuple[str, ...]:
        """Every quantized linear of a decoder layer, in execution order."""
        return tuple(name for group in self.groups for name in group.linears)


_LLAMA_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), gqa=True),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
)

# Gemma 2/3: the attention output passes post_attention_layernorm before the residual add, and the MLP reads
# pre_feedforward_layernorm's output.
_GEMMA2_GROUPS = (
    _LLAMA_GROUPS[0],
    _LLAMA_GROUPS[1],
    ScaleGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    _LLAMA_GROUPS[3],
)

_PHI3_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
    ScaleGroup("self_attn.qkv_proj", ("self_attn.o_proj",), prev_rows="v", gqa=True),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
    ScaleGroup("mlp.gate_up_proj", ("mlp.down_proj",), prev_rows="up"),
)

FAMILIES: tuple[Family, ...] = (
    Family(
        "llama",
        ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "InternLM2ForCausalLM"),
        _LLAMA_GROUPS,
    ),
    Family("gemma", ("GemmaForCausalLM",), _LLAMA_GROUPS, norm_offset=1.0),
    Family(
        "gemma2",
        ("Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
        _GEMMA2_GROUPS,
        norm_offset=1.0,
    ),
    Family("phi3", ("Phi3ForCausalLM",), _PHI3_GROUPS),
)


def supported_architectures() -> list[str]:
    """The config.json architectures lm-lite can quantize, sorted."""
    return sorted(arch for family in FAMILIES for arch in family.architectures)


def family_for(architecture: str) -> Family:
    """The family of a config.json `architectures[0]`; a clear error listing the supported ones otherwise."""
    for family in FAMILIES:
        if architecture in family.architectures:
            return family
    raise ValueError(
        f"architecture {architecture!r} is not supported by lm-lite (supported: {', '.join(supported_architectures())})"
    )


def text_config(config: dict) -> dict:
    """The language model's part of a config.json dict (Gemma 3's multimodal checkpoint nests it)."""
    return config.get("text_config") or config


def head_dim(config: dict) -> int:
    """The attention head size of a config.json dict (`head_dim`, else hidden size over heads)."""
    cfg = text_config(config)
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every decoder linear, from config.json alone (no weights loaded).

    Names follow the family's table after loading (InternLM2 as Llama, Phi-3 packed).
    """
    cfg = text_config(config)
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    q_size, kv_size = heads * head_dim(config), kv_heads * head_dim(config)
    return {
        "self_attn.q_proj": (q_size, hidden),
        "self_attn.k_proj": (kv_size, hidden),
        "self_attn.v_proj": (kv_size, hidden),
        "self_attn.qkv_proj": (q_size + 2 * kv_size, hidden),
        "self_attn.o_proj": (hidden, q_size),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.gate_up_proj": (2 * inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }


def read_config(model_dir: Path) -> dict:
    """The model's config.json."""
    return json.loads((model_dir / "config.json").read_text())


def architecture(config: dict) -> str:
    """The first architecture config.json names, or a ValueError when it names none."""
    architectures = config.get("architectures") or []
    if not architectures:
        raise ValueError("config.json names no architecture")
    return architectures[0]


# Group sizes tried, largest first, when the user gives none: 128 is the common choice (AutoAWQ's, GPTQ's).
GROUP_SIZE_CHOICES = (128, 64, 32)


def pick_group_size(config: dict, family: Family) -> int:
    """The largest of `GROUP_SIZE_CHOICES` that divides the input features of every quantized linear.

    A ValueError names the model's input dimensions when none does (then -1, one group per row, still works).
    """
    shapes = linear_shapes(config)
    dims = sorted({shapes[name][1] for name in family.linears})
    for size in GROUP_SIZE_CHOICES:
        if all(d % size == 0 for d in dims):
            return size
    raise ValueError(
        f"none of the group sizes {', '.join(map(str, GROUP_SIZE_CHOICES))} divides every input dimension of this "
        f"model ({', '.join(map(str, dims))}): pass w_group_size=-1 (one group per row) or a divisor of all of them"
    )


def check_group_size(
    config: dict, family: Family, group_size: int, pack_axis: str | None = None, pack_factor: int = 8
) -> None:
    """Raise a ValueError naming the linear when `group_size` does not divide an input dimension.

    `pack_axis` "out"/"in": the packed int32 layout also needs that dimension to be a multiple of `pack_factor`.
    """
    shapes = {name: linear_shapes(config)[name] for name in family.linears}
    dims = sorted({in_features for _, in_features in shapes.values()})
    for name, (out_features, in_features) in shapes.items():
        if group_size != -1 and in_features % group_size:
            valid = [g for g in (32, 64, 128, 256) if all(d % g == 0 for d in dims)]
            hint = f"group sizes that divide every one: {', '.join(map(str, valid))} or -1 (per channel)"
            raise ValueError(
                f"w_group_size={group_size} does not divide in_features={in_features} of {name} "
                f"(input dimensions of this model: {', '.join(map(str, dims))}; {hint})"
            )
        packed = {"out": out_features, "in": in_features}.get(pack_axis or "")
        if packed is not None and packed % pack_factor:
            raise ValueError(
                f"{name} has {packed} {pack_axis}put features, not a multiple of {pack_factor}: it cannot be packed"
            )
