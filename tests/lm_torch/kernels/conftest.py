"""Kernel tests run twice over: on the CPU through triton's interpreter in float32, and compiled on a CUDA GPU in
bf16 and fp16 (marker `gpu`). The `case` fixture hands each test its device, dtype and tolerances.

Without CUDA, TRITON_INTERPRET=1 is set here, before any kernel module imports triton (the jit decorator reads it
when a kernel is defined). With CUDA, the GPU cases run compiled; `TRITON_INTERPRET=1 pytest ...` runs the CPU cases
there instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
COMPILED_GPU = torch.cuda.is_available() and not INTERPRETING


@dataclass(frozen=True)
class Case:
    """One device/dtype a kernel test runs on, with the tolerances for its two kinds of kernels."""

    device: str
    dtype: torch.dtype
    # Elementwise kernels (norm, rotary, activation): float32 math, one rounding to dtype at the end, so the
    # reference (same float32 math) differs by about one unit in the last place of dtype.
    elementwise_tol: float
    # Attention: the softmax weights enter the P @ V product in dtype (as in every flash kernel), and the sums run
    # in another order than the reference's.
    attention_tol: float

    def randn(self, *shape: int, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
        """Standard normal values (never zeros) in the case's dtype, on its device."""
        return (torch.randn(*shape, generator=generator) * scale).to(self.device, self.dtype)

    @staticmethod
    def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
        """Elementwise |actual - expected| <= tol * (1 + |expected|), in float32; NaN never passes."""
        actual, expected = actual.float().cpu(), expected.float().cpu()
        assert actual.shape == expected.shape, (actual.shape, expected.shape)
        assert not actual.isnan().any(), "NaN in the kernel's output (an element left unwritten?)"
        torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


CPU_FP32 = Case("cpu", torch.float32, elementwise_tol=1e-5, attention_tol=2e-5)
CUDA_BF16 = Case("cuda", torch.bfloat16, elementwise_tol=1.6e-2, attention_tol=2.5e-2)
CUDA_FP16 = Case("cuda", torch.float16, elementwise_tol=2e-3, attention_tol=4e-3)

_needs_interpreter = pytest.mark.skipif(not INTERPRETING, reason="CPU cases run under TRITON_INTERPRET=1")
_needs_gpu = pytest.mark.skipif(not COMPILED_GPU, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
CASES = [
    pytest.param(CPU_FP32, id="cpu-fp32", marks=_needs_interpreter),
    pytest.param(CUDA_BF16, id="cuda-bf16", marks=[pytest.mark.gpu, _needs_gpu]),
    pytest.param(CUDA_FP16, id="cuda-fp16", marks=[pytest.mark.gpu, _needs_gpu]),
]


@pytest.fixture(params=CASES)
def case(request) -> Case:
    """The device and dtype a kernel test runs on (see `CASES`)."""
    pytest.importorskip("triton")
    return request.param


@dataclass
class PagedBatch:
    """A step's attention inputs: new tokens' queries and a paged cache already holding every sequence's context."""

    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, shuffled non-contiguous blocks
    query_lens: list[int]
    context_lens: list[int]
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    context_lens_tensor: torch.Tensor  # [num_seqs] int32


def make_paged_batch(
    case: Case,
    seed: int,
    query_lens: list[int],
    context_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int = 16,
    q_scale: float = 1.0,
) -> PagedBatch:
    """Random queries and a random cache (unused slots hold random values too), blocks handed out shuffled."""
    gen = torch.Generator().manual_seed(seed)
    used = [-(-ctx // block_size) for ctx in context_lens]
    num_blocks = sum(used) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(used)
    tables, first = [], 0
    for n in used:
        tables.append(order[first : first + n] + [0] * (width - n))
        first += n
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return PagedBatch(
        q=case.randn(starts[-1], num_heads, head_dim, generator=gen, scale=q_scale),
        k_cache=case.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen),
        v_cache=case.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen),
        block_tables=torch.tensor(tables, dtype=torch.int64, device=case.device),
        query_lens=list(query_lens),
        context_lens=list(context_lens),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=case.device),
        context_lens_tensor=torch.tensor(context_lens, dtype=torch.int32, device=case.device),
    )


@pytest.fixture
def paged_batch():
    """`make_paged_batch(case, seed, query_lens, context_lens, num_heads, num_kv_heads, head_dim, ...)`."""
    return make_paged_batch
