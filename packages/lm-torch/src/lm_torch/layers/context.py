"""`BuildContext`: what a model's layers are built for, so that each picks its code path once, in `__init__`.

The loader makes one per model (device, compute dtype, the checkpoint's quantization, the kernel settings and
tuning tables, the attention backend, the tensor-parallel group) and hands it to the model class, which passes it to
every layer. Norms, rotary embeddings and activations bind their torch or Triton forward from it; linears get their
`LinearMethod` (or their quantized layer) from `make_linear`; `PagedAttention` takes the backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lm_torch.config import KernelConfig
from lm_torch.distributed.group import SINGLE, TPGroup
from lm_torch.kernels import triton_available

if TYPE_CHECKING:
    from lm_torch.kernels.tuning import TuningTables
    from lm_torch.layers.quant import QuantConfig

HALF_TYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class BuildContext:
    """The target of a model being built; layers read it in `__init__` only."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    quant_config: QuantConfig | None = None
    kernels: KernelConfig = field(default_factory=KernelConfig)
    tuning: TuningTables | None = None  # CUDA: the kernels' tables (None: the shipped ones)
    attention_backend: Any = None  # an attention backend object (`lm_torch.attention`)
    cpu_linear_splits: int | None = None  # CPU: column blocks of a dense linear (None: torch's thread count then)
    tp: TPGroup = SINGLE  # the tensor-parallel group: layers hold their shard of heads, channels and vocabulary

    @classmethod
    def current(cls, **overrides: Any) -> BuildContext:
        """A context for torch's current default device and dtype (models built outside the loader, in tests)."""
        values: dict[str, Any] = {"device": torch.get_default_device(), "dtype": torch.get_default_dtype()}
        return cls(**{**values, **overrides})

    @property
    def runs_triton(self) -> bool:
        """Whether layers take their Triton kernels: a CUDA device with triton installed."""
        return self.device.type == "cuda" and triton_available()


def context_or_current(ctx: BuildContext | None) -> BuildContext:
    """`ctx`, or the context of torch's current default device and dtype."""
    return ctx if ctx is not None else BuildContext.current()
