"""RMSNorm, optionally fused with the residual add that precedes it; its path (torch or Triton) chosen at
construction."""

from __future__ import annotations

from typing import TYPE_CHECKING, overload

import torch
from torch import nn

from lm_torch.layers.context import BuildContext, context_or_current

NormOutput = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    """y = x / rms(x) * w, computed in float32 like transformers. Gemma stores w - 1 (`offset=1.0`)."""

    def __init__(
        self, hidden_size: int, eps: float = 1e-6, offset: float = 0.0, ctx: BuildContext | None = None
    ) -> None:
        super().__init__()
        ctx = context_or_current(ctx)
        self.weight = nn.Parameter(torch.ones(hidden_size) if offset == 0.0 else torch.zeros(hidden_size))
        self.eps = eps
        self.offset = offset
        self.allow_pdl = ctx.kernels.pdl
        self._forward = self.forward_triton if ctx.runs_triton else self.forward_native

    if TYPE_CHECKING:  # nn.Module types every call as returning Any; these are `forward`'s two result types

        @overload
        def __call__(self, x: torch.Tensor, residual: None = None) -> torch.Tensor: ...
        @overload
        def __call__(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
        def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> NormOutput:
            """Runs `forward`: norm(x) alone, or (norm(x + residual), x + residual) with `residual`."""
            ...

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> NormOutput:
        """With `residual`: returns (norm(x + residual), x + residual), the pair every pre-norm block needs."""
        return self._forward(x, residual)

    def forward_triton(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> NormOutput:
        """One Triton kernel does the add and the norm (same rounding as `forward_native`)."""
        from lm_torch.kernels.rms_norm import rms_norm

        out, total = rms_norm(x, self.weight, self.eps, residual, self.offset, allow_pdl=self.allow_pdl)
        if residual is None or total is None:
            return out
        return out, total

    def forward_native(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> NormOutput:
        """The torch computation."""
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        # Llama casts back before scaling by the weight; Gemma scales in float32.
        out = self.weight * h.to(dtype) if self.offset == 0.0 else (h * (self.offset + self.weight.float())).to(dtype)
        return out if residual is None else (out, residual)

    def pre_norm(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A decoder layer's opening norm: the first layer starts the residual stream, later ones add to it."""
        if residual is None:
            return self(hidden), hidden  # type: ignore[return-value]
        return self(hidden, residual)  # type: ignore[return-value]
