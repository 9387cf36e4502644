"""How many KV-cache blocks the engine allocates, and the start-up lines that say where the memory went.

On CUDA the budget is `kv_cache_gb` exactly, or `cache_max_entry_count` of the memory free once the weights are
loaded, and in either case no more than leaves the activation reserve free: the peak the largest step needs (a
`max_prefill_token_num`-token forward pass, its logits and a sampler run with every stage on, measured by running
them at start-up) plus the CUDA graphs' pool. The scheduler never schedules more tokens than that step, and running
out of KV blocks preempts sequences instead of allocating, so a running engine does not hit out-of-memory.
On the CPU the default is a fixed number of tokens, `cpu_default_kv_tokens`: one full session, and at least
`CPU_MIN_KV_TOKENS` (32 sequences of 256 tokens, about the most a CPU decodes at a useful speed), so the cache never
depends on how much RAM happened to be free at start-up; it is capped by `cpu_kv_cache_gb` and, on a machine short of
RAM, by `CPU_DEFAULT_RAM_FRACTION` of the available RAM. An explicit `cache_max_entry_count` takes that fraction of
the available RAM instead (capped by `cpu_kv_cache_gb`), as on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lm_torch.config import TorchEngineConfig

GIB = 1024**3
# Room beyond the measured peaks for what no profile run shows: allocator fragmentation, cuBLAS workspaces of new
# streams, the pinned staging buffers' device twins.
SAFETY_MARGIN = 512 * 1024**2
CUDA_DEFAULT_FRACTION = 0.8  # cache_max_entry_count when unset, on CUDA
CPU_MIN_KV_TOKENS = 32 * 256
CPU_DEFAULT_RAM_FRACTION = 0.5  # the CPU default never takes more of the available RAM than this


@dataclass
class MemoryPlan:
    """The numbers behind the KV-cache size (bytes)."""

    weight_bytes: int
    free_bytes: int  # free memory once the weights were loaded (CPU: available RAM)
    activation_reserve: int  # kept free for activations and CUDA graphs (0 on CPU)
    kv_bytes_per_block: int
    num_blocks: int
    block_size: int
    source: str  # how the budget was chosen, for the start-up line

    @property
    def kv_bytes(self) -> int:
        """Bytes of the whole KV cache."""
        return self.num_blocks * self.kv_bytes_per_block

    @property
    def num_tokens(self) -> int:
        """Token slots of the whole KV cache."""
        return self.num_blocks * self.block_size

    def summary(self) -> str:
        """The start-up line: weights, free memory, activation reserve, KV blocks and the tokens they hold."""
        reserve = f", activation reserve {self.activation_reserve / GIB:.2f} GiB" if self.activation_reserve else ""
        return (
            f"memory: weights {self.weight_bytes / GIB:.2f} GiB, {self.free_bytes / GIB:.2f} GiB free after them"
            f"{reserve}; KV cache {self.kv_bytes / GIB:.2f} GiB ({self.source}) = {self.num_blocks} blocks x "
            f"{self.block_size} = {self.num_tokens} tokens"
        )


def free_memory(device: torch.device) -> int:
    """Bytes free for the KV cache: the device's free memory on CUDA, the available RAM on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cpu_default_kv_tokens(session_len: int) -> int:
    """Tokens of the CPU's default KV cache: one full session, and at least `CPU_MIN_KV_TOKENS`."""
    return max(session_len, CPU_MIN_KV_TOKENS)


def plan_kv_cache(
    config: TorchEngineConfig,
    kv_bytes_per_block: int,
    weight_bytes: int,
    session_len: int,
    *,
    free: int,
    activation_reserve: int,
    on_gpu: bool,
) -> MemoryPlan:
    """Choose the number of KV blocks (see the module docstring) given `free` bytes (`free_memory`, taken once the
    weights are loaded). Raises ValueError, naming the setting, when an explicit size cannot fit next to the
    weights and the activation reserve, or when fewer than two blocks fit."""
    usable = free - activation_reserve - SAFETY_MARGIN if on_gpu else free
    if config.cache.num_kv_blocks is not None:
        budget, source = config.cache.num_kv_blocks * kv_bytes_per_block, f"num_kv_blocks {config.cache.num_kv_blocks}"
        if on_gpu and budget > usable:
            raise ValueError(_too_large("num_kv_blocks", budget, free, activation_reserve))
    elif config.cache.kv_cache_gb is not None:
        budget, source = config.cache.kv_cache_gb * GIB, f"kv_cache_gb {config.cache.kv_cache_gb:g}"
        if on_gpu and budget > usable:
            raise ValueError(_too_large("kv_cache_gb", budget, free, activation_reserve))
    elif on_gpu:
        fraction = config.cache.cache_max_entry_count or CUDA_DEFAULT_FRACTION
        budget = free * fraction
        source = f"cache_max_entry_count {fraction:g} of the free memory"
        if budget > usable:
            budget, source = usable, f"{source}, capped to leave the activation reserve"
    elif config.cache.cache_max_entry_count is not None:
        budget = min(free * config.cache.cache_max_entry_count, config.cache.cpu_kv_cache_gb * GIB)
        source = f"cache_max_entry_count {config.cache.cache_max_entry_count:g} of free RAM, at most cpu_kv_cache_gb"
    else:
        tokens = cpu_default_kv_tokens(session_len)
        budget = -(-tokens // config.cache.block_size) * kv_bytes_per_block
        source = f"CPU default: {tokens} tokens, one full session and at least {CPU_MIN_KV_TOKENS}"
        if budget > config.cache.cpu_kv_cache_gb * GIB:
            budget, source = config.cache.cpu_kv_cache_gb * GIB, f"{source}, capped at cpu_kv_cache_gb"
        if budget > free * CPU_DEFAULT_RAM_FRACTION:
            budget = free * CPU_DEFAULT_RAM_FRACTION
            source = f"{source}, capped at {CPU_DEFAULT_RAM_FRACTION:g} of the available RAM"
    num_blocks = int(budget // kv_bytes_per_block)
    if config.cache.num_kv_blocks is None:
        # Never more than the longest session times the batch size could use: no point holding more.
        useful = config.scheduler.max_batch_size * (session_len // config.cache.block_size + 1)
        if num_blocks > useful:
            num_blocks, source = useful, f"{source}, capped at what max_batch_size sessions can use"
    if num_blocks < 2:
        raise ValueError(f"the KV-cache budget ({budget / 1024**2:.0f} MiB) holds fewer than two blocks")
    return MemoryPlan(
        weight_bytes, free, activation_reserve, kv_bytes_per_block, num_blocks, config.cache.block_size, source
    )


def _too_large(name: str, budget: float, free: int, reserve: int) -> str:
    return (
        f"TorchEngineConfig.{name} asks for a {budget / GIB:.2f} GiB KV cache, but only {free / GIB:.2f} GiB are free "
        f"after the weights, of which {(reserve + SAFETY_MARGIN) / GIB:.2f} GiB must stay free for activations: "
        f"at most {max(free - reserve - SAFETY_MARGIN, 0) / GIB:.2f} GiB fit"
    )
