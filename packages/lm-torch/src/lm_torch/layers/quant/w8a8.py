"""W8A8 linears of SmoothQuant checkpoints (LMDeploy's `quant_method: smooth_quant` layout).

Tensors: `weight` [out, in] int8 (or float8_e4m3fn with `quant_dtype: float8_e4m3fn`), `scale` [out, 1] float32 per
output channel, optional `bias`. Activations are quantized per token and dynamically in every call:
    s_x[t] = max_i |x[t, i]| / 127,  x_q = round(x / s_x) in int8,  y = (x_q @ W_q^T) * s_x[t] * scale[o] + bias.
On the CPU the int8 product runs in float64 (every int8 x int8 sum over K < 2^39 is exact there, and torch's CPU
`_int_mm` is ~25x slower than a float64 GEMM), on CUDA without the kernels in int32 with `_int_mm`; float8 weights
are multiplied in float32 after the same per-token quantization of the activations to float8 (s_x = max |x| / 448).
On CUDA with triton the kernels of `kernels.w8a8` run it: a Triton per-token quantization, then a Triton int8 GEMM
with the scales (and bias) applied in its epilogue, or for float8 `torch._scaled_mm` with row-wise scales.
"""

from __future__ import annotations

import torch

from lm_torch.distributed.group import SINGLE, TPGroup
from lm_torch.layers.context import BuildContext, context_or_current
from lm_torch.layers.linear import LinearBase
from lm_torch.layers.quant.packed import quant_param

QUANT_DTYPES = {"int8": torch.int8, "float8_e4m3fn": torch.float8_e4m3fn, "fp8": torch.float8_e4m3fn}
_QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def quantize_per_token(x: torch.Tensor, dtype: torch.dtype, tp: TPGroup = SINGLE) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, in] float -> (x_q [rows, in] in `dtype`, s_x [rows, 1] float32). Under tensor parallelism x is this
    rank's share of a row-parallel layer's inputs, and the scale is the whole row's (the maximum over the ranks), so
    that the sum of the ranks' products is the unsharded layer's result."""
    x = x.float()
    amax = tp.all_reduce_max(x.abs().amax(dim=-1, keepdim=True))
    scale = amax.clamp(min=1e-7) / _QMAX[dtype]
    if dtype == torch.int8:
        return torch.round(x / scale).clamp(-128, 127).to(torch.int8), scale
    return (x / scale).clamp(-448, 448).to(dtype), scale


class W8A8Linear(LinearBase):
    """int8 (or float8) weights per output channel, per-token dynamic activations."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        quant_dtype: str,
        dtype: torch.dtype,
        ctx: BuildContext | None = None,
        row_parallel: bool = False,
    ) -> None:
        super().__init__()
        ctx = context_or_current(ctx)
        self.runs_triton = ctx.runs_triton
        # A row-parallel rank quantizes its share of each row with the whole row's scale (`quantize_per_token`).
        self.tp = ctx.tp if row_parallel else SINGLE
        if quant_dtype not in QUANT_DTYPES:
            raise ValueError(f"smooth_quant quant_dtype {quant_dtype!r} is not supported ({', '.join(QUANT_DTYPES)})")
        self.in_features, self.out_features = in_features, out_features
        self.qdtype = QUANT_DTYPES[quant_dtype]
        self.weight = quant_param(torch.zeros(out_features, in_features, dtype=self.qdtype), 0, input_dim=1)
        self.scale = quant_param(torch.ones(out_features, 1, dtype=torch.float32), 0)
        self.bias = quant_param(torch.zeros(out_features, dtype=dtype), 0) if bias else None
        self.weight_t: torch.Tensor | None = None

    def finish_loading(self) -> None:
        """Keep `weight` [out, in] for the kernels, else the transposed operand of the torch products."""
        if self._runs_kernels():
            return  # the kernels take `weight` [out, in] as the checkpoint holds it
        # The products want the right operand [in, out]; float8 is multiplied in float32 (no float8 matmul on the CPU).
        weight_t = self.weight.data.t().contiguous()
        self.weight_t = weight_t if self.qdtype == torch.int8 else weight_t.float()

    def process_weights_after_loading(self) -> None:
        """`finish_loading`."""
        self.finish_loading()

    def _runs_kernels(self) -> bool:
        if not self.runs_triton:
            return False
        # torch._scaled_mm needs both matrix dimensions in multiples of 16.
        return self.qdtype == torch.int8 or (self.in_features % 16 == 0 and self.out_features % 16 == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in x's dtype."""
        flat = x.reshape(-1, self.in_features)
        if self.weight_t is None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
            from lm_torch.kernels import w8a8

            if self.tp.size > 1:  # the row's scale needs every rank's maximum: quantized with torch ops
                x_q, x_scale = quantize_per_token(flat, self.qdtype, self.tp)
            else:
                x_q, x_scale = w8a8.quantize_per_token(flat.contiguous(), self.qdtype)
            if self.qdtype == torch.int8:
                out = w8a8.int8_gemm(x_q, x_scale, self.weight, self.scale, self.bias, x.dtype)
            else:
                out = w8a8.fp8_linear(x_q, x_scale, self.weight, self.scale, self.bias, x.dtype)
            return out.view(*x.shape[:-1], self.out_features)
        x_q, x_scale = quantize_per_token(flat, self.qdtype, self.tp)
        weight_t = self.weight_t if self.weight_t is not None else self.weight.t()
        if self.qdtype == torch.int8:
            rows = x_q.shape[0]
            if x_q.device.type != "cuda":  # exact sums in float64 (see the module's docstring), rounded as int32's
                acc = (x_q.double() @ weight_t.double()).float()
            else:
                if rows <= 16:  # cuBLAS int8 GEMMs need more than 16 rows: pad, then drop the padding.
                    x_q = torch.cat([x_q, x_q.new_zeros(17 - rows, self.in_features)])
                # exact int32 sums; torch leaves _int_mm out of its typed exports
                acc = torch._int_mm(x_q, weight_t.to(torch.int8))[:rows].float()  # pyright: ignore[reportPrivateImportUsage]
        else:
            acc = x_q.float() @ weight_t.float()
        out = (acc * x_scale * self.scale.t()).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def init_dummy(self, generator: torch.Generator) -> None:
        """Random int8 weights with the spread of normal(0, 0.02), for benchmarks."""
        values = torch.randint(-127, 128, self.weight.shape, generator=generator, device=self.weight.device)
        self.weight.data.copy_(values.to(self.qdtype))
        self.scale.data.fill_(0.02 / 73.0)  # uniform integers in [-127, 127] have a standard deviation of about 73

    def extra_repr(self) -> str:
        """Shape and storage dtype."""
        return f"in_features={self.in_features}, out_features={self.out_features}, quant_dtype={self.qdtype}"
