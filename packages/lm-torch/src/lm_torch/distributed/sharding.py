"""Which part of a checkpoint tensor a tensor-parallel rank holds, and reading only that part.

A sharded parameter carries `tp_dim`, the dimension split over the ranks (parameters without it are whole on every
rank). Its size along `tp_dim` is this rank's share, so the range to read follows from the checkpoint tensor's size
there (`shard_range`):
- an even split: `local * size` channels, rank r holds `[r * local, (r + 1) * local)`;
- replication: fewer shards than ranks (KV heads when tp > num_kv_heads): `n` shards, each held by `size / n`
  consecutive ranks;
- padding (`tp_padded`, the vocabulary): the channels run out before the last rank's share ends; the rest of the
  share is zero.
A row-parallel layer's bias (`tp_rank0_only`) is added once, by rank 0: the other ranks hold zeros.

Checkpoint tensors arrive as `LazyTensor`s from safetensors files: a rank reads its range only (safetensors'
`get_slice`), so no process ever holds a whole checkpoint, or a whole large tensor, in memory.
"""

from __future__ import annotations

from typing import Any

import torch


class LazyTensor:
    """A checkpoint tensor not read yet (a safetensors slice): its shape, and reads of all of it or of one range."""

    __slots__ = ("_slice", "device", "shape")

    def __init__(self, safetensors_slice: Any, device: torch.device | str) -> None:
        self._slice = safetensors_slice
        self.shape = torch.Size(safetensors_slice.get_shape())
        self.device = torch.device(device)

    def read(self) -> torch.Tensor:
        """The whole tensor."""
        return self._slice[:].to(self.device)

    def read_range(self, dim: int, start: int, length: int) -> torch.Tensor:
        """Entries `[start, start + length)` along `dim`, every entry of the other dimensions."""
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        return self._slice[tuple(index)].to(self.device)

    def __repr__(self) -> str:
        return f"LazyTensor(shape={tuple(self.shape)})"


TensorLike = torch.Tensor | LazyTensor


def materialize(tensor: TensorLike) -> torch.Tensor:
    """The whole tensor (read now if lazy)."""
    return tensor.read() if isinstance(tensor, LazyTensor) else tensor


def read_range(tensor: TensorLike, dim: int, start: int, length: int) -> torch.Tensor:
    """`tensor.narrow(dim, start, length)`, reading only that range of a lazy tensor."""
    if isinstance(tensor, LazyTensor):
        return tensor.read_range(dim, start, length)
    return tensor.narrow(dim, start, length)


def shard_range(total: int, local: int, rank: int, size: int, padded: bool = False, what: str = "tensor") -> int:
    """The first of the `local` channels (out of the checkpoint's `total`) that `rank` of `size` holds; see the
    module docstring. A ValueError naming `what` when `total` fits none of the three layouts."""
    if local == total or size == 1:
        return 0
    if padded:
        if not local * (size - 1) < total <= local * size:
            raise ValueError(f"{what}: {total} channels do not pad to {size} shards of {local}")
        return rank * local
    if local <= 0 or total % local:
        raise ValueError(f"{what}: {total} channels do not split into shards of {local} (tensor parallel {size})")
    shards = total // local
    if shards > size or size % shards:
        raise ValueError(f"{what}: {shards} shards of {local} channels do not spread over {size} ranks")
    return (rank // (size // shards)) * local


def shard_for(param: torch.Tensor, tensor: TensorLike, rank: int, size: int, what: str) -> torch.Tensor:
    """This rank's part of checkpoint `tensor` for `param` (whole when `param` is not sharded), materialized."""
    dim = getattr(param, "tp_dim", None)
    if getattr(param, "tp_rank0_only", False) and rank != 0:
        return torch.zeros(tensor.shape, dtype=param.dtype, device=param.device)
    if dim is None or size == 1:
        return materialize(tensor)
    return read_shard(tensor, dim, param.shape[dim], rank, size, bool(getattr(param, "tp_padded", False)), what)


def read_shard(
    tensor: TensorLike, dim: int, local: int, rank: int, size: int, padded: bool = False, what: str = "tensor"
) -> torch.Tensor:
    """The `local` channels along `dim` of `tensor` that `rank` holds, zero-padded past the checkpoint's end."""
    total = tensor.shape[dim]
    start = shard_range(total, local, rank, size, padded, what)
    length = max(0, min(local, total - start))
    part = read_range(tensor, dim, start, length) if length else None
    if length == local and part is not None:
        return part
    shape = list(tensor.shape)
    shape[dim] = local
    dtype = part.dtype if part is not None else materialize_dtype(tensor)
    out = torch.zeros(shape, dtype=dtype, device=part.device if part is not None else _device(tensor))
    if part is not None:
        out.narrow(dim, 0, length).copy_(part)
    return out


def materialize_dtype(tensor: TensorLike) -> torch.dtype:
    """The dtype of `tensor` (a lazy tensor reads one entry to learn it)."""
    if isinstance(tensor, LazyTensor):
        return tensor.read_range(0, 0, 1).dtype
    return tensor.dtype


def _device(tensor: TensorLike) -> torch.device:
    return tensor.device


def mark_sharded(param: torch.Tensor, dim: int | None, padded: bool = False) -> None:
    """Declare `param` split over the ranks along `dim` (None: whole on every rank)."""
    vars(param).update(tp_dim=dim, tp_padded=padded)


def mark_rank0_only(param: torch.Tensor) -> None:
    """Declare `param` added by rank 0 alone (a row-parallel bias): zero on the other ranks."""
    vars(param).update(tp_dim=None, tp_rank0_only=True)


def divide(total: int, size: int, what: str) -> int:
    """total / size, or a ValueError naming `what` and the tensor-parallel size when it does not divide."""
    if total % size:
        raise ValueError(f"tensor parallel size (tp) {size} does not divide {what} ({total})")
    return total // size


def check_tensor_parallel(hf_config: Any, tp: int) -> None:
    """A ValueError naming --tp when the model cannot be split `tp` ways (checked before any rank starts): the
    attention heads and the MLP's intermediate size must divide, the KV heads divide or be replicated evenly."""
    if tp == 1:
        return
    config = getattr(hf_config, "text_config", None) or hf_config
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    intermediate = getattr(config, "intermediate_size", None)
    problems = []
    if heads is not None and heads % tp:
        problems.append(f"num_attention_heads ({heads})")
    if intermediate is not None and intermediate % tp:
        problems.append(f"intermediate_size ({intermediate})")
    if kv_heads is not None and kv_heads % tp and tp % kv_heads:
        problems.append(f"num_key_value_heads ({kv_heads}), which must divide tp or be divided by it")
    if problems:
        raise ValueError(f"--tp {tp} does not divide the model's {' and '.join(problems)}")
