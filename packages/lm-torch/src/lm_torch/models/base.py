"""What every model file shares: logits, weight copying with shape checks, fused-weight loading; under tensor
parallelism each copy takes this rank's part of the checkpoint tensor (`lm_torch.distributed.sharding`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol, cast

import torch
from torch import nn

from lm_torch.distributed.group import SINGLE, TPGroup
from lm_torch.distributed.sharding import TensorLike, materialize, read_shard, shard_for
from lm_torch.layers.context import BuildContext

if TYPE_CHECKING:
    from lm_torch.attention.base import AttentionState, StepMetadata
    from lm_torch.layers.attention import PagedAttention


class _SelfAttention(Protocol):
    attn: PagedAttention


class _DecoderLayer(Protocol):
    self_attn: _SelfAttention


class CausalLM(nn.Module):
    """Base of our model classes. Subclasses define `forward(input_ids, positions, kv_caches, attn) -> hidden`
    (`attn`: the step's `AttentionState`, see `prepare_attention`), `load_weights(weights) -> loaded names`, and own
    `embed_tokens`, `lm_head` and `layers`."""

    #: multiplies the logits (Gemma2-style soft-capping uses `final_logit_softcapping` instead).
    final_logit_softcapping: float | None = None
    # Set by every subclass's __init__.
    embed_tokens: nn.Module
    lm_head: nn.Module
    layers: nn.ModuleList

    def __init__(self, config, ctx: BuildContext | None = None) -> None:
        super().__init__()
        self.config = config
        self.tp: TPGroup = ctx.tp if ctx is not None else SINGLE

    def compute_logits(self, hidden: torch.Tensor, for_argmax: bool = False) -> torch.Tensor:
        """hidden: [num_rows, hidden] -> logits: [num_rows, vocab] in float32 (unless `for_argmax`).

        `for_argmax`: the caller only takes each row's arg-max. Without soft-capping the lm_head's own output (bf16
        in a bf16 model) is returned as it is: widening to float32 is exact, so the arg-max, first index on ties
        included, is the same, and a 256-row step skips writing and reading 128k float32 logits a row.

        Under tensor parallelism each rank's LM head gives its share of the vocabulary; they are gathered (every rank
        calls this with the same rows) and the padding past the vocabulary dropped."""
        logits = self.lm_head(hidden)
        if self.tp.size > 1:
            logits = self.tp.all_gather(logits, dim=-1)[:, : self.config.vocab_size]
        cap = getattr(self.config, "final_logit_softcapping", None)
        if for_argmax and not cap:
            return logits
        logits = logits.float()
        if cap:  # tanh can map distinct bf16 values to one float32 value: capped logits are always float32
            logits = cap * torch.tanh(logits / cap)
        return logits

    def kv_cache_shape(self) -> list[tuple[int, int]]:
        """(num_kv_heads, head_dim) of each layer, for allocating the paged cache."""
        return [(attn.num_kv_heads, attn.head_dim) for attn in self.attention_layers()]

    def attention_layers(self) -> list[PagedAttention]:
        """Every layer's `PagedAttention`."""
        # nn.ModuleList yields plain nn.Modules; every decoder layer holds its PagedAttention at `self_attn.attn`.
        layers = cast("Iterable[_DecoderLayer]", self.layers)
        return [layer.self_attn.attn for layer in layers]

    def prepare_attention(self, meta: StepMetadata) -> AttentionState:
        """The per-step state this model's attention backend derives from `meta` (what `forward` takes)."""
        backend = self.attention_layers()[0].backend
        if backend is None:
            raise ValueError("the model was built without an attention backend (BuildContext.attention_backend)")
        return backend.prepare(meta)

    def copy_weight(self, params: dict[str, nn.Parameter], name: str, tensor: TensorLike) -> None:
        """Copy a checkpoint tensor (this rank's part of it) into the parameter of that name, its shape checked."""
        if name not in params:
            raise KeyError(f"checkpoint tensor {name!r} has no place in the model")
        param = params[name]
        loader = getattr(param, "weight_loader", None)
        if loader is not None:  # a layer that reads its checkpoint layout itself (`layers.quant.fp8`)
            loader(tensor, None, None, self.tp, name)
            return
        tensor = shard_for(param, tensor, self.tp.rank, self.tp.size, name)
        if param.shape != tensor.shape:
            raise ValueError(
                f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(tensor)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy (name, tensor) pairs of a checkpoint in; returns the parameter names loaded."""
        raise NotImplementedError


def output_layout(param: torch.Tensor) -> tuple[int | None, int]:
    """(dimension of output channels, output channels per element) of a parameter: (0, 1) for dense weights;
    quantized parameters say otherwise (`lm_torch.layers.quant.packed`), None for a tensor all shards share."""
    return getattr(param, "output_dim", 0), getattr(param, "output_pack", 1)


def load_fused(
    param: nn.Parameter, tensor: TensorLike, shard: int, sizes: list[int], tp: TPGroup = SINGLE, what: str = "fused"
) -> None:
    """Copy `tensor` into output channels `shard` of a parameter fused from several checkpoint tensors (sizes in
    output channels, this rank's, laid along dimension 0 for dense weights, elsewhere and packed for quantized ones).
    Under tensor parallelism `tensor` is the whole checkpoint tensor, of which this rank reads its part. A parameter
    with a `weight_loader(tensor, shard, sizes, tp, what)` attribute loads the part itself."""
    loader = getattr(param, "weight_loader", None)
    if loader is not None:
        loader(tensor, shard, sizes, tp, what)
        return
    dim, pack = output_layout(param)
    if dim is None:
        _load_shared(param, materialize(tensor), shard)
        return
    if any(size % pack for size in sizes):
        raise ValueError(f"fused output sizes {sizes} do not divide into groups of {pack} packed channels")
    sizes = [size // pack for size in sizes]
    if tp.size > 1 and getattr(param, "tp_dim", None) is not None:
        tensor = read_shard(tensor, dim, sizes[shard], tp.rank, tp.size, what=f"{what} part {shard}")
    else:
        tensor = materialize(tensor)
    start = sum(sizes[:shard])
    expected = list(param.shape)
    expected[dim] = sizes[shard]
    if list(tensor.shape) != expected:
        raise ValueError(f"fused shard {shard} has shape {tuple(tensor.shape)}, expected {tuple(expected)}")
    with torch.no_grad():
        param.narrow(dim, start, sizes[shard]).copy_(tensor)


def _load_shared(param: nn.Parameter, tensor: torch.Tensor, shard: int) -> None:
    # Every shard carries the whole tensor (GPTQ's g_idx); they must agree, since the fused module has one.
    if tensor.shape != param.shape:
        raise ValueError(f"fused shard {shard} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
    seen = vars(param).setdefault("loaded_shards", set())
    if seen and not torch.equal(param.data, tensor.to(param.dtype)):
        raise ValueError("the fused projections' checkpoint tensors disagree (e.g. GPTQ g_idx of q, k and v)")
    with torch.no_grad():
        param.copy_(tensor)
    seen.add(shard)
