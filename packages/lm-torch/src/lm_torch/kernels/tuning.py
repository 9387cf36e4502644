"""The kernels' tuning tables, loaded once into one `TuningTables` object that the engine hands down.

Three tables, each a JSON file measured on one card (benchmarks/decode_ragged.py, gemm.py and w4a16.py write them):
the decode-attention plan per decode count, the small-batch GEMM launch per (rows, N, K[, activation]) and the
W4A16 launch shape per (rows bucket, N, K, group_size). `KernelConfig` names each ("none": no table; None: the one
shipped beside its kernel). A table measured on another card than `device_name` is left out where it says so.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from lm_torch.config import KernelConfig
from lm_torch.kernels.decode_attention import DEFAULT_DECODE_TUNING, _decode_table
from lm_torch.kernels.gemm import DEFAULT_TUNING as DEFAULT_GEMM_TUNING
from lm_torch.kernels.gemm import launch_from_table, load_gemm_table
from lm_torch.kernels.w4a16 import DEFAULT_TUNING as DEFAULT_W4A16_TUNING
from lm_torch.kernels.w4a16 import load_w4a16_table, rows_bucket


@dataclass(frozen=True)
class TuningTables:
    """The tables of one engine, for one card (`device_name`, None off CUDA)."""

    device_name: str | None
    decode_path: str
    decode_named: bool
    gemm_table: dict[tuple, list[tuple[int, dict | None]]]
    w4a16_table: dict[str, dict]
    # (head_dim, kv element bytes) -> the decode rows for caches of that shape, parsed on first use.
    _decode_rows: dict[tuple[int, int], tuple[tuple[int, dict], ...]] = field(default_factory=dict, compare=False)

    @classmethod
    def load(cls, kernels: KernelConfig | None = None, device_name: str | None = None) -> TuningTables:
        """Read the tables `kernels` names (a named file that does not exist is a ValueError naming the field)."""
        kernels = kernels if kernels is not None else KernelConfig()
        decode = kernels.decode_tuning or DEFAULT_DECODE_TUNING
        return cls(
            device_name=device_name,
            decode_path=decode,
            decode_named=kernels.decode_tuning is not None,
            gemm_table=load_gemm_table(
                kernels.gemm_tuning or DEFAULT_GEMM_TUNING, device_name, named=kernels.gemm_tuning is not None
            ),
            w4a16_table=load_w4a16_table(
                kernels.w4a16_tuning or DEFAULT_W4A16_TUNING, named=kernels.w4a16_tuning is not None
            ),
        )

    def decode_plan(self, num_decodes: int, k_cache: torch.Tensor) -> dict | None:
        """The decode plan for the fewest decodes measured at or above `num_decodes` with this cache ([blocks,
        block_size, kv_heads, head_dim]: head_dim and element size must be the table's), or None: no such table, a
        quantized cache, or a larger batch than any row."""
        if not k_cache.is_floating_point():  # quantized codes: the kernel's defaults
            return None
        key = (k_cache.shape[-1], k_cache.element_size())
        rows = self._decode_rows.get(key)
        if rows is None:
            rows = _decode_table(self.decode_path, self.device_name, *key, named=self.decode_named)
            self._decode_rows[key] = rows
        for measured, plan in rows:
            if measured >= num_decodes:
                return plan
        return None

    def gemm_launch(self, rows: int, n: int, k: int, activation: str | None = None):
        """(kernel, keyword arguments) of the small-batch GEMM for this shape, or None for cuBLAS."""
        return launch_from_table(self.gemm_table, rows, n, k, activation)

    def w4a16_config(self, m: int, n: int, k: int, group_size: int) -> dict | None:
        """The W4A16 launch shape for `m` rows of an N x K weight, or None for `w4a16_linear`'s defaults."""
        return self.w4a16_table.get(f"{rows_bucket(m)}:{n}:{k}:{group_size}")


@functools.cache
def shipped_tables(device_name: str | None) -> TuningTables:
    """The tables shipped beside the kernels, for callers not handed the engine's tables."""
    return TuningTables.load(KernelConfig(), device_name)
