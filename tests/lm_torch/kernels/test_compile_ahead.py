"""`kernels.common.compile_ahead`: launches inside compile (on a thread pool) without running; afterwards the same
launches run from triton's cache and compute what plain launches compute. Under the interpreter it changes nothing."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from lm_torch.kernels.common import compile_ahead


@triton.jit
def _scaled_copy(src, dst, n, factor, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(dst + offsets, tl.load(src + offsets, mask=mask) * factor, mask=mask)


def _launch(src, dst, block):
    _scaled_copy[(triton.cdiv(src.numel(), block),)](src, dst, src.numel(), 3.0, BLOCK=block)


def test_compile_ahead(case):
    gen = torch.Generator().manual_seed(0)
    src = case.randn(1000, generator=gen)
    blocks = (64, 128, 256)  # three specializations: compiled side by side
    outputs = {block: torch.zeros_like(src) for block in blocks}
    with compile_ahead(workers=3):
        for block in blocks:
            _launch(src, outputs[block], block)
    for block in blocks:
        if case.device == "cuda":
            # Compiled, not run: the outputs are untouched, and every specialization is in the cache.
            assert not outputs[block].any()
        else:  # the interpreter ran them
            case.assert_close(outputs[block], src.float() * 3.0, case.elementwise_tol)
    if case.device == "cuda":
        device = torch.cuda.current_device()
        cached = _scaled_copy.device_caches[device][0]
        assert len(cached) >= len(blocks)
        for block in blocks:
            _launch(src, outputs[block], block)
        assert len(cached) == len(_scaled_copy.device_caches[device][0])  # nothing compiled again
        for block in blocks:
            case.assert_close(outputs[block], src.float() * 3.0, case.elementwise_tol)


def test_compile_ahead_restores_launches_after_an_error(case):
    src = case.randn(100, generator=torch.Generator().manual_seed(1))
    out = torch.zeros_like(src)
    with pytest.raises(RuntimeError, match="inside"), compile_ahead(workers=1):
        raise RuntimeError("inside")
    _launch(src, out, 128)  # runs for real again
    case.assert_close(out, src.float() * 3.0, case.elementwise_tol)
