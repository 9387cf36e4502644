"""Triton kernels for CUDA GPUs, each behind a small wrapper and checked against a plain-torch reference.

| module | kernel | reference (`kernels.reference`) |
|---|---|---|
| `kv_cache` | write the step's K/V (or their int8/int4 codes) into the paged cache | `store_kv_cache(_quantized)` |
| `decode_attention` | one new token per sequence over its paged context, split-K | `paged_attention` |
| `prefill_attention` | new tokens over a cached prefix + themselves (causal or per-token limits) | `paged_attention` |
| `rms_norm` | residual add fused with RMSNorm (Llama and Gemma weights) | `rms_norm` |
| `rotary` | rotary embedding from precomputed cos/sin tables, neox and gptj layouts, in place | `rotary` |
| `activation` | act(gate) * up for silu, gelu (erf) and gelu (tanh) | `gated_activation` |
| `sampling` | temperature, top-k, top-p, min-p and the inverse-CDF draw, one program per row, no sort | `sample` |
| `gemv` | y = x @ W^T for one row x (batch-1 linear layers), optional split-K | `linear` |
| `w4a16` | 4-bit grouped weights (AWQ/GPTQ): one-row GEMV, dequantizing tensor-core GEMM | `w4a16_linear` |
| `w8a8` | per-token int8/fp8 activation quantization, int8 GEMM with a scale epilogue | `w8a8_linear` |
| `fp8_gemm` | blocked FP8: 1x128 activation quantization, GEMM with 128x128 block scales | dequantize + matmul |
| `fused_moe` | experts: token sort, grouped GEMMs (gate fused, routing weights), top-k sum | `fused_moe` |

Nothing here is imported by `import lm_torch`: the modules with kernels import triton at their top, so only code
that runs on CUDA (the Triton attention backend, the tests) imports them. On a CPU, `TRITON_INTERPRET=1` set before
triton is imported runs the same kernels through triton's interpreter, which is how the tests check them there.
"""

from __future__ import annotations

import functools
import importlib.util


@functools.cache
def triton_available() -> bool:
    """Whether triton is installed (it is a Linux x86-64 dependency of lm-torch; other platforms run without it)."""
    return importlib.util.find_spec("triton") is not None


def runs_triton(tensor) -> bool:
    """Whether a layer should hand `tensor` (a torch.Tensor) to its Triton kernel: on CUDA, with triton installed.
    Everywhere else the layers compute in plain torch."""
    return tensor.is_cuda and triton_available()
