"""Mixture-of-experts layers: softmax top-k routing, the routed experts held as stacks, a gated shared expert.

Routing (`softmax_topk`) follows transformers' Qwen2-MoE, Qwen3-MoE and Mixtral routers: the router logits in the
model's dtype, their softmax in float32, `torch.topk` over it (the same ordering and tie-breaking), renormalised over
the k chosen when the family says so (Mixtral always; Qwen when `norm_topk_prob`). Qwen's routers round the weights to
the model's dtype before the experts use them, Mixtral's keep float32 (`round_weights`).

`FusedMoE` holds every expert's projections stacked: `w13` [E, 2I, H] with each expert's [gate; up] rows and `w2`
[E, H, I], what the Triton kernel `lm_torch.kernels.fused_moe.fused_moe` reads; on the CPU (and CUDA without triton)
a torch loop over the experts that received tokens computes the same sum. Under tensor parallelism every rank holds
every expert, each with its share I / tp of the intermediate channels (gate and up split like a column-parallel
layer, w2 like a row-parallel one): a rank's output is a partial sum, all-reduced once by `SparseMoeBlock`.

Checkpoints store the experts one tensor per expert and projection (`experts.{e}.gate_proj/up_proj/down_proj.weight`,
Mixtral's `w1/w3/w2`) or stacked as transformers holds them in memory (`experts.gate_up_proj` [E, 2I, H],
`experts.down_proj` [E, H, I]); `SparseMoeBlock.load_weight` takes both, and our own stacked names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lm_torch.distributed.group import TPGroup
from lm_torch.distributed.sharding import (
    TensorLike,
    divide,
    mark_sharded,
    materialize,
    read_range,
    read_shard,
    shard_for,
)
from lm_torch.layers.activation import ACTIVATIONS, GatedActivation, gated_activation, gated_projection
from lm_torch.layers.context import BuildContext, context_or_current
from lm_torch.layers.linear import make_linear
from lm_torch.models.base import load_fused

# Checkpoint names of an expert's projections -> the part of the stacks they fill.
EXPERT_PARTS = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}
# Names of whole stacks (transformers' in-memory ones, and ours) -> our stack.
STACKED_NAMES = {"gate_up_proj": "w13", "down_proj": "w2", "w13": "w13", "w2": "w2"}


def softmax_topk(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:  # ([M, k] float32, [M, k] int64)
    """The k best experts of each token by softmax probability (float32), renormalised to sum to 1 if asked."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [M, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def moe_torch(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, act: str = "silu"
) -> torch.Tensor:  # [M, H]
    """sum_j weights[:, j] * down_e(act(gate_e(x)) * up_e(x)) with e = ids[:, j], one expert at a time (those that
    received a token), accumulated in x's dtype as transformers does. x [M, H], w13 [E, 2I, H], w2 [E, H, I],
    weights [M, k] float32, ids [M, k]."""
    out = torch.zeros_like(x)
    top_k = ids.shape[1]
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert, in token order within one
    tokens = order // top_k
    slot_weights = weights.flatten()[order]
    start = 0
    for expert, count in enumerate(torch.bincount(flat, minlength=w13.shape[0]).tolist()):
        if count == 0:
            continue
        rows = tokens[start : start + count]
        hidden = gated_activation(F.linear(x[rows], w13[expert]), act)  # [count, I]
        y = F.linear(hidden, w2[expert]) * slot_weights[start : start + count, None]  # float32 product
        out.index_add_(0, rows, y.to(out.dtype))
        start += count
    return out


class FusedMoE(nn.Module):
    """The routed experts: `w13` [E, 2I, H] ([gate; up] rows of each expert) and `w2` [E, H, I], I this rank's."""

    def __init__(
        self, num_experts: int, hidden: int, intermediate: int, act: str = "silu", ctx: BuildContext | None = None
    ) -> None:
        super().__init__()
        ctx = context_or_current(ctx)
        self.tp = ctx.tp
        self.num_experts, self.hidden = num_experts, hidden
        self.total_intermediate = intermediate
        self.intermediate = divide(intermediate, self.tp.size, "the experts' intermediate size")  # this rank's share
        self.act = act
        if act not in ACTIVATIONS:
            raise ValueError(f"activation {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.intermediate, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, self.intermediate))
        if self.tp.size > 1:  # the split dimensions, which the loader's dummy init reads (loader._unsplit_shape)
            mark_sharded(self.w13, 1)
            mark_sharded(self.w2, 2)
        self.use_triton = ctx.runs_triton
        # (expert, part) pairs not loaded yet: a stack counts as loaded once all its experts' tensors are in.
        self._pending = {(e, part) for e in range(num_experts) for part in ("gate", "up", "down")}

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:  # [M, H]
        """x [M, H], weights [M, k] float32, ids [M, k] -> this rank's partial sum of the experts' outputs."""
        if self.use_triton:
            from lm_torch.kernels.fused_moe import fused_moe

            return fused_moe(x, self.w13, self.w2, weights, ids, activation=self.act)
        return moe_torch(x, self.w13, self.w2, weights, ids, self.act)

    def load_expert(self, expert: int, part: str, tensor: TensorLike) -> set[str]:
        """One expert's "gate" or "up" [I, H] or "down" [H, I] checkpoint tensor (this rank's share of it) into the
        stacks; returns the stacks now complete ("w13", "w2")."""
        inter = self.total_intermediate
        expected = (self.hidden, inter) if part == "down" else (inter, self.hidden)
        _check_shape(tensor, expected, f"expert {expert} {part}")
        dim = 1 if part == "down" else 0
        rows = read_shard(tensor, dim, self.intermediate, self.tp.rank, self.tp.size) if self.tp.size > 1 else tensor
        rows = materialize(rows)
        with torch.no_grad():
            if part == "down":
                self.w2[expert].copy_(rows)
            else:
                start = 0 if part == "gate" else self.intermediate
                self.w13[expert, start : start + self.intermediate].copy_(rows)
        self._pending.discard((expert, part))
        return self._complete()

    def load_stacked(self, stack: str, tensor: TensorLike) -> set[str]:
        """Every expert at once: "w13" [E, 2I, H] ([gate; up] rows) or "w2" [E, H, I]; returns the stacks complete."""
        inter, local, rank = self.total_intermediate, self.intermediate, self.tp.rank
        if stack == "w13":
            _check_shape(tensor, (self.num_experts, 2 * inter, self.hidden), "stacked gate/up experts")
            halves = [read_range(tensor, 1, half * inter + rank * local, local) for half in (0, 1)]
            with torch.no_grad():
                self.w13.copy_(torch.cat(halves, dim=1))
            parts = ("gate", "up")
        else:
            _check_shape(tensor, (self.num_experts, self.hidden, inter), "stacked down experts")
            with torch.no_grad():
                self.w2.copy_(read_range(tensor, 2, rank * local, local))
            parts = ("down",)
        self._pending -= {(e, part) for e in range(self.num_experts) for part in parts}
        return self._complete()

    def _complete(self) -> set[str]:
        done = set()
        if not any(part != "down" for _, part in self._pending):
            done.add("w13")
        if not any(part == "down" for _, part in self._pending):
            done.add("w2")
        return done

    def extra_repr(self) -> str:
        """Experts and sizes."""
        return f"experts={self.num_experts}, hidden={self.hidden}, intermediate={self.intermediate}, act={self.act}"


class SharedExpertMLP(nn.Module):
    """A dense gated MLP beside the routed experts (Qwen2-MoE), its output left as this rank's partial sum."""

    def __init__(self, hidden: int, intermediate: int, act: str, prefix: str, ctx: BuildContext) -> None:
        super().__init__()
        self.intermediate = divide(intermediate, ctx.tp.size, "shared_expert_intermediate_size")
        self.total_intermediate = intermediate
        self.gate_up_proj = make_linear(ctx, hidden, 2 * self.intermediate, False, f"{prefix}.gate_up_proj", "column")
        self.down_proj = make_linear(ctx, self.intermediate, hidden, False, f"{prefix}.down_proj", shard="row")
        self.act_fn = GatedActivation(act, ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, H] -> [M, H] (not all-reduced)."""
        return self.down_proj(gated_projection(self.gate_up_proj, x, self.act_fn))


class SparseMoeBlock(nn.Module):
    """Router, routed experts and optional sigmoid-gated shared expert; the output all-reduced over the ranks."""

    def __init__(
        self,
        hidden: int,
        num_experts: int,
        top_k: int,
        intermediate: int,
        renormalize: bool,
        act: str,
        layer_idx: int,
        ctx: BuildContext | None = None,
        round_weights: bool = False,
        shared_intermediate: int = 0,
    ) -> None:
        super().__init__()
        ctx = context_or_current(ctx)
        prefix = f"{layer_idx}.mlp"
        if ctx.quant_config is not None:
            from lm_torch.layers.quant import is_quantized

            if is_quantized(f"{prefix}.experts", ctx.quant_config):
                raise ValueError(f"{ctx.quant_config.method} quantized MoE experts are not supported by lm-torch")
        self.tp = ctx.tp
        self.top_k, self.renormalize, self.round_weights = top_k, renormalize, round_weights
        self.gate = nn.Linear(hidden, num_experts, bias=False)  # the router, replicated on every rank
        self.experts = FusedMoE(num_experts, hidden, intermediate, act, ctx)
        self.shared_expert = None
        self.shared_expert_gate = None
        if shared_intermediate:
            self.shared_expert = SharedExpertMLP(hidden, shared_intermediate, act, f"{prefix}.shared_expert", ctx)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # ([M, k] float32, [M, k] int64)
        """Routing weights and expert ids of each token of x [M, H]."""
        weights, ids = softmax_topk(self.gate(x), self.top_k, self.renormalize)
        if self.round_weights:  # transformers' Qwen routers hand the experts weights in the model's dtype
            weights = weights.to(x.dtype).float()
        return weights, ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, H] -> [M, H]."""
        out = self.experts(x, *self.route(x))
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return self.tp.all_reduce(out)

    def load_weight(self, name: str, tensor: TensorLike) -> set[str]:
        """A checkpoint tensor named relative to this block (e.g. "experts.3.w1.weight", "experts.gate_up_proj",
        "shared_expert.up_proj.weight") into place; returns the names of the parameters now loaded."""
        head, _, rest = name.partition(".")
        if head == "experts":
            return {f"experts.{stack}" for stack in self._load_experts(rest.split("."), tensor, name)}
        if head == "shared_expert" and self.shared_expert is not None:
            return {f"shared_expert.{param}" for param in self._load_shared(rest, tensor, name)}
        params = dict(self.named_parameters())
        if name not in params:
            raise KeyError(f"checkpoint tensor {name!r} has no place in the MoE block")
        _copy(params[name], tensor, self.tp, name)
        return {name}

    def _load_experts(self, parts: list[str], tensor: TensorLike, name: str) -> set[str]:
        if len(parts) == 3 and parts[0].isdigit() and parts[1] in EXPERT_PARTS and parts[2] == "weight":
            return self.experts.load_expert(int(parts[0]), EXPERT_PARTS[parts[1]], tensor)
        if len(parts) == 1 and parts[0] in STACKED_NAMES:
            return self.experts.load_stacked(STACKED_NAMES[parts[0]], tensor)
        raise KeyError(f"checkpoint tensor {name!r} is not an expert weight this block knows")

    def _load_shared(self, rest: str, tensor: TensorLike, name: str) -> set[str]:
        expert = self.shared_expert
        assert expert is not None
        params = dict(expert.named_parameters())
        proj, _, leaf = rest.partition(".")
        sizes = [expert.intermediate] * 2  # this rank's gate and up channels
        if proj in ("gate_proj", "up_proj"):
            target = f"gate_up_proj.{leaf}"
            load_fused(params[target], tensor, int(proj == "up_proj"), sizes, self.tp, name)
            return {target}
        if proj == "gate_up_proj" and self.tp.size > 1:  # [gate; up] whole: each rank takes a piece of each half
            total = expert.total_intermediate
            for half in (0, 1):
                load_fused(params[rest], read_range(tensor, 0, half * total, total), half, sizes, self.tp, name)
            return {rest}
        if rest not in params:
            raise KeyError(f"checkpoint tensor {name!r} has no place in the shared expert")
        _copy(params[rest], tensor, self.tp, name)
        return {rest}


def _check_shape(tensor: TensorLike, expected: tuple[int, ...], what: str) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"checkpoint tensor for {what} has shape {tuple(tensor.shape)}, expected {expected}")


def _copy(param: torch.Tensor, tensor: TensorLike, tp: TPGroup, name: str) -> None:
    loader = getattr(param, "weight_loader", None)
    if loader is not None:  # a layer that reads its checkpoint layout itself, as `CausalLM.copy_weight` honours
        loader(tensor, None, None, tp, name)
        return
    tensor = shard_for(param, tensor, tp.rank, tp.size, name)
    if tensor.shape != param.shape:
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(tensor)
