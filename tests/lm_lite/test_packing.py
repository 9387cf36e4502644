"""The packed layouts, checked against the formats' definitions written out by hand, and round trips."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lm_lite.packing import AWQ_ORDER, pack_awq, pack_gptq, pack_rows, unpack_awq, unpack_gptq, unpack_rows
from lm_lite.quant_math import QuantizedWeight, quantize_groups


def _signed(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


def test_awq_word_holds_columns_in_the_interleaved_order():
    # Output channel o of input row 0 holds the integer o: nibble k (bits 4k..4k+3) must hold column AWQ_ORDER[k].
    q = QuantizedWeight(
        qweight=torch.arange(8, dtype=torch.int32)[:, None],  # [out 8, in 1]
        scales=torch.ones(8, 1),
        zeros=torch.zeros(8, 1, dtype=torch.int32),
        bits=4,
        group_size=1,
    )
    expected = sum(column << (4 * k) for k, column in enumerate((0, 2, 4, 6, 1, 3, 5, 7)))
    assert expected == 0x75316420
    assert pack_awq(q)["qweight"].tolist() == [[_signed(expected)]]


def test_gptq_word_holds_inputs_in_order_and_zeros_minus_one():
    # Input i of output 0 holds the integer i; symmetric 4-bit zero points are 8, stored as 7 in every nibble.
    q = QuantizedWeight(
        qweight=torch.arange(8, dtype=torch.int32)[None, :].repeat(8, 1),  # [out 8, in 8]
        scales=torch.ones(8, 1),
        zeros=torch.full((8, 1), 8, dtype=torch.int32),
        bits=4,
        group_size=8,
    )
    tensors = pack_gptq(q)
    assert tensors["qweight"].shape == (1, 8)
    assert tensors["qweight"][0, 0].item() == 0x76543210
    assert tensors["qzeros"].tolist() == [[0x77777777]]  # 2004318071, the value of every symmetric GPTQ checkpoint
    assert tensors["g_idx"].tolist() == [0] * 8


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), words=st.integers(1, 4), rows=st.integers(1, 3), seed=st.integers(0, 999))
def test_pack_unpack_round_trip(bits, words, rows, seed):
    per_word = 32 // bits
    values = torch.randint(0, 2**bits, (rows, words * per_word), generator=torch.Generator().manual_seed(seed))
    order = AWQ_ORDER if bits == 4 else None
    packed = pack_rows(values, bits, order)
    assert packed.dtype == torch.int32 and packed.shape == (rows, words)
    assert torch.equal(unpack_rows(packed, bits, order), values.to(torch.int32))


@pytest.mark.parametrize("group_size", [32, -1])
def test_awq_tensors_dequantize_to_exactly_the_quantized_weights(group_size):
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    q = quantize_groups(w, 4, group_size)
    tensors = pack_awq(q)
    assert tensors["qweight"].shape == (64, 6) and tensors["scales"].dtype == torch.float16
    groups = 1 if group_size == -1 else 64 // group_size
    assert tensors["qzeros"].shape == (groups, 6) and tensors["scales"].shape == (groups, 48)
    assert torch.equal(unpack_awq(tensors["qweight"], tensors["qzeros"], tensors["scales"], group_size), q.dequantize())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gptq_tensors_dequantize_to_exactly_the_quantized_weights(bits):
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    q = quantize_groups(w, bits, 16, sym=True)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(2))
    q.g_idx = (torch.arange(64) // 16)[perm].to(torch.int32)  # an act-order style permutation of groups
    tensors = pack_gptq(q)
    assert tensors["qweight"].shape == (64 * bits // 32, 32)
    dense = unpack_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], bits)
    assert torch.equal(dense, q.dequantize())


def test_gptq_refuses_a_zero_point_it_cannot_store():
    q = quantize_groups(torch.rand(8, 8), 4, 8)  # all-positive groups: asymmetric zero point 0
    with pytest.raises(ValueError, match="zero point of 0"):
        pack_gptq(q)
