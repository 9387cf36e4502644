"""A tensor-parallel group and the collectives the model layers and the runner call.

`TPGroup` holds this process's rank, the group's size and two torch.distributed process groups: `device_group` for
tensors where the model runs (NCCL on CUDA; gloo on the CPU, and gloo on CUDA tensors, the mode that lets several
ranks share one GPU for tests), and `cpu_group` (always gloo) for host values such as each step's batch. A size-1
group (`SINGLE`) has no process groups and every collective returns its input: layers call them unconditionally.

`init_tp_group` joins the group through a TCP rendezvous at `host:port` (rank 0 hosts the store). Every wait is
bounded by `timeout_s`: a rank that never joins is an error naming how many did, not a hang.
"""

from __future__ import annotations

import datetime
import pickle
from dataclasses import dataclass
from typing import Any

import torch

BACKENDS = ("nccl", "gloo")


class RendezvousError(RuntimeError):
    """The ranks did not all meet (a rank or a node never joined) within the timeout."""


@dataclass(frozen=True, eq=False)
class TPGroup:
    """This process's place in a tensor-parallel group (rank 0 of 1 when not distributed)."""

    rank: int = 0
    size: int = 1
    device_group: Any = None  # torch.distributed.ProcessGroup for device tensors
    cpu_group: Any = None  # gloo ProcessGroup for host tensors and objects
    backend: str = "none"  # of device_group: "nccl", "gloo", or "none" for a size-1 group

    @property
    def is_distributed(self) -> bool:
        """Whether there is more than one rank."""
        return self.size > 1

    @property
    def is_driver(self) -> bool:
        """Rank 0: the rank that samples and answers the engine."""
        return self.rank == 0

    @property
    def graphs_capturable(self) -> bool:
        """Whether the collectives can be captured in a CUDA graph (NCCL can, gloo runs on the host)."""
        return self.size == 1 or self.backend == "nccl"

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of `x` over the ranks, in place (x itself at size 1)."""
        if self.size > 1:
            torch.distributed.all_reduce(x, group=self.device_group)
        return x

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        """The element-wise maximum of `x` over the ranks, in place (x itself at size 1)."""
        if self.size > 1:
            torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX, group=self.device_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's `x` concatenated along `dim`, in rank order (x itself at size 1)."""
        if self.size == 1:
            return x
        x = x.contiguous()
        out = torch.empty((self.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather_single(out, x, group=self.device_group)  # the ranks' tensors one after another along dim 0
        out = out.view(self.size, *x.shape)
        dim = dim % x.dim()
        # [size, ..., d, ...] -> [..., size * d, ...]: the rank axis moves next to `dim` and merges with it.
        return out.movedim(0, dim).reshape(*x.shape[:dim], self.size * x.shape[dim], *x.shape[dim + 1 :])

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s `x` on every rank, in place."""
        if self.size > 1:
            torch.distributed.broadcast(x, src=src, group=self.device_group)
        return x

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s `obj` (pickled) on every rank: one broadcast of its length, one of its bytes."""
        if self.size == 1:
            return obj
        if self.rank == src:
            data = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
            length = torch.tensor([data.numel()], dtype=torch.int64)
        else:
            data, length = None, torch.zeros(1, dtype=torch.int64)
        torch.distributed.broadcast(length, src=src, group=self.cpu_group)
        if data is None:
            data = torch.empty(int(length.item()), dtype=torch.uint8)
        torch.distributed.broadcast(data, src=src, group=self.cpu_group)
        return obj if self.rank == src else pickle.loads(data.numpy().tobytes())

    def min_int(self, value: int) -> int:
        """The smallest of every rank's `value`."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.size > 1:
            torch.distributed.barrier(group=self.cpu_group)


SINGLE = TPGroup()
# torch 2.13 renamed all_gather_into_tensor (which it still accepts, with a warning) to all_gather_single.
_all_gather_single = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor


def parse_addr(addr: str, what: str = "dist_init_addr") -> tuple[str, int]:
    """'host:port' -> (host, port); a ValueError naming `what` otherwise."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} must be 'host:port', got {addr!r}")
    return host.strip("[]"), int(port)


def init_tp_group(
    rank: int, size: int, init_addr: str, device: torch.device, backend: str | None = None, timeout_s: float = 300.0
) -> TPGroup:
    """Join the tensor-parallel group of `size` ranks as `rank` through the rendezvous at `init_addr` ('host:port').

    backend: of the device group; None picks NCCL on CUDA and gloo on the CPU. A rank that does not join within
    `timeout_s` makes every other rank fail with a RuntimeError saying how many joined.
    """
    import torch.distributed as dist

    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend not in BACKENDS:
        raise ValueError(f"dist_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if size == 1:
        return SINGLE
    host, port = parse_addr(init_addr)
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(  # pyright: ignore[reportPrivateImportUsage] - public, not in torch's __all__
            host, port, size, is_master=rank == 0, timeout=timeout, wait_for_workers=True
        )
    except (RuntimeError, dist.DistStoreError) as exc:  # type: ignore[attr-defined]
        raise RendezvousError(
            f"the {size} tensor-parallel ranks did not all meet at {host}:{port} within {timeout_s:.0f} s "
            f"(a rank or node never joined: check --tp, --nnodes, --node-rank and --dist-init-addr): {exc}"
        ) from exc
    options: dict[str, Any] = {}
    if backend == "nccl":
        options["device_id"] = device
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout, **options)
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    return TPGroup(rank, size, dist.group.WORLD, cpu_group, backend)


def destroy_tp_group(group: TPGroup) -> None:
    """Leave the process group (no-op at size 1)."""
    import torch.distributed as dist

    if group.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
