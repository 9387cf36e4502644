"""W4A16 linears of AWQ (AutoAWQ GEMM) and GPTQ checkpoints: packed integer weights, float activations.

Layouts (for a linear with in_features inputs, out_features outputs, groups of g inputs):
    AWQ   qweight [in, out / 8]  int32, 4-bit fields in AutoAWQ's interleaved order (0, 2, 4, 6, 1, 3, 5, 7)
          qzeros  [in / g, out / 8] int32, same packing;  scales [in / g, out]
    GPTQ  qweight [in * bits / 32, out] int32, fields in order along the input dimension
          qzeros  [groups, out * bits / 32] int32 holding zero - 1 (checkpoint_format "gptq"; "gptq_v2" holds zero)
          scales  [groups, out];  g_idx [in] int32, the group of each input (act-order permutes it)
    W[o, i] = (q[i, o] - zero[group(i), o]) * scale[group(i), o].
On the CPU the weights are dequantized once after loading and multiplied as a dense input-major matrix
(`SplitInputMajorLinear`): that keeps the speed of the dense model at its memory, which is what the CPU path is for
(checking and running quantized checkpoints); `cache_dense=False` dequantizes in every call instead, saving the
memory at a large cost in time (docs/quantization.md has the numbers).
On CUDA (with triton, bf16/fp16 activations) 4-bit weights are repacked once into the layout of `kernels.w4a16`
(`packed` [out, in / 8] int32, `scales` and `zeros` [groups, out]) and the checkpoint tensors are dropped; GPTQ's
act-order is undone by permuting the weight's inputs so that each group is contiguous, and `input_perm` gathers x's
columns the same way in every call. Other cases there (GPTQ 2/8-bit, a g_idx whose groups are not all
`group_size` inputs, float32 activations) keep a dequantized dense weight.
"""

from __future__ import annotations

import torch
from torch import nn

from lm_torch.layers.context import BuildContext, context_or_current
from lm_torch.layers.linear import Linear, LinearBase, SplitInputMajorLinear
from lm_torch.layers.quant.packed import quant_param, unpack_int32

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_HALF = (torch.bfloat16, torch.float16)


class _WeightOnlyLinear(LinearBase):
    """Shared forward: the W4A16 kernels (CUDA), a cached dense copy, or dequantize-and-multiply; which one is decided
    once the weights are loaded (`process_weights_after_loading`), from the device and dtype it was built for."""

    bits: int

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        group_size: int,
        dtype: torch.dtype,
        ctx: BuildContext | None = None,
    ) -> None:
        super().__init__()
        self.build_ctx = context_or_current(ctx)
        self.tuning = self.build_ctx.tuning
        self.in_features, self.out_features = in_features, out_features
        self.group_size = in_features if group_size == -1 else group_size
        if in_features % self.group_size:
            raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
        self.num_groups = in_features // self.group_size
        self.bias = quant_param(torch.zeros(out_features, dtype=dtype), 0) if bias else None
        self.dense: nn.Module | None = None
        self.cache_dense = True
        # Set by `repack_for_kernels` on CUDA: the kernel layout, and the input permutation of act-order GPTQ.
        self.register_parameter("packed", None)
        self.register_parameter("zeros", None)
        self.register_buffer("input_perm", None, persistent=False)

    def _dequantize_checkpoint(self) -> torch.Tensor:
        """W^T [in, out] in the scales' dtype, from the checkpoint tensors."""
        raise NotImplementedError

    def int4_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(q [in, out] ints in [0, 16), zeros [groups, out] ints, g_idx [in] or None for contiguous groups)."""
        raise NotImplementedError

    def finish_loading(self) -> None:
        """Called once the checkpoint is loaded: on CUDA, repack 4-bit weights for the W4A16 kernels; elsewhere
        (and for what the kernels do not take) keep the dequantized weight as a dense linear."""
        device = self.scales.device
        takes_kernels = self.build_ctx.runs_triton and self.bits == 4 and self.scales.dtype in _HALF
        if takes_kernels and self.repack_for_kernels():
            self.can_fold_qkv_rotary = self.bias is None and self.input_perm is None
            return
        if not self.cache_dense:
            return
        if device.type == "cpu":
            linear = nn.Linear(self.in_features, self.out_features, bias=False, dtype=self.scales.dtype, device="meta")
            linear.weight = nn.Parameter(self.dequantize().t(), requires_grad=False)
            self.dense = SplitInputMajorLinear(linear, torch.get_num_threads())
        else:  # a dense `Linear` with the method of the build context (the small-batch kernels on CUDA)
            dense = Linear(self.in_features, self.out_features, False, self.build_ctx, "meta", self.scales.dtype)
            dense.weight = nn.Parameter(self.dequantize().t().contiguous(), requires_grad=False)
            self.dense = dense
            self._drop_checkpoint_tensors()

    def process_weights_after_loading(self) -> None:
        """`finish_loading`."""
        self.finish_loading()

    def repack_for_kernels(self) -> bool:
        """Checkpoint tensors -> `packed`, `scales`, `zeros` (+ `input_perm`); False when the groups are uneven."""
        from lm_torch.kernels.w4a16 import block_inputs, pack_int4

        try:
            block_inputs(self.group_size)
        except ValueError:
            return False  # a group size the layout cannot block (not a multiple of 16)
        q, zeros, g_idx = self.int4_weights()
        perm = None
        if g_idx is not None:
            perm = torch.argsort(g_idx.long(), stable=True)  # inputs ordered by group; each group contiguous
            expected = torch.arange(self.in_features, device=g_idx.device) // self.group_size
            if not torch.equal(g_idx.long()[perm], expected):
                return False  # groups of other sizes than group_size: not this layout
            if torch.equal(perm, torch.arange(self.in_features, device=perm.device)):
                perm = None
            else:
                q = q[perm]
        scales = self.scales.data
        dtype = scales.dtype
        self._drop_checkpoint_tensors()
        # packed: [out, in / 8] int32; scales, zeros: [groups, out] in the activation dtype.
        self.packed = nn.Parameter(pack_int4(q.t().contiguous(), self.group_size), requires_grad=False)
        self.scales = nn.Parameter(scales.contiguous(), requires_grad=False)
        self.zeros = nn.Parameter(zeros.to(dtype).contiguous(), requires_grad=False)
        self.input_perm = perm
        return True

    def _drop_checkpoint_tensors(self) -> None:
        for name in ("qweight", "qzeros", "g_idx"):
            if hasattr(self, name):
                delattr(self, name)

    def dequantize(self) -> torch.Tensor:
        """W^T [in, out] in the scales' dtype."""
        if self.packed is None:
            if not hasattr(self, "qweight"):  # a CUDA dense fallback dropped the checkpoint tensors
                assert isinstance(self.dense, Linear)  # the checkpoint tensors are dropped only once it is built
                return self.dense.weight.t()
            return self._dequantize_checkpoint()
        from lm_torch.kernels.reference import unpack_int4

        q = unpack_int4(self.packed, self.group_size).t()  # [in, out] in the kernel's (act-order sorted) input order
        groups = torch.arange(self.in_features, device=q.device) // self.group_size
        w = ((q - self.zeros[groups].float()) * self.scales[groups].float()).to(self.scales.dtype)
        if self.input_perm is not None:
            w = torch.empty_like(w).index_copy_(0, self.input_perm, w)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.dtype == self.scales.dtype:
            from lm_torch.kernels.w4a16 import w4a16_linear

            flat = x.reshape(-1, self.in_features)  # [tokens, in]
            if self.input_perm is not None:
                flat = flat.index_select(1, self.input_perm)
            out = w4a16_linear(
                flat.contiguous(), self.packed, self.scales, self.zeros, self.group_size, tuning=self.tuning
            )
            out = out.view(*x.shape[:-1], self.out_features)
        elif self.dense is not None:
            out = self.dense(x)
        else:
            out = (x.reshape(-1, self.in_features) @ self.dequantize().to(x.dtype)).view(*x.shape[:-1], -1)
        return out if self.bias is None else out + self.bias

    def _one_row_kernel(self, x: torch.Tensor) -> bool:
        """Whether x is one row this layer's W4A16 kernels take as it is (CUDA, packed weights in x's dtype, no bias
        or input permutation): where the one-row GEMV can fold the next operation into its last step."""
        return (
            self.packed is not None
            and x.dtype == self.scales.dtype
            and x.device.type == "cuda"
            and x.numel() == self.in_features
            and self.bias is None
            and self.input_perm is None
        )

    def forward_qkv_rotary(self, x: torch.Tensor, rope) -> torch.Tensor | None:
        """This [q | k | v] layer for one token with the rotary embedding and the KV-cache write folded in
        (`kernels.w4a16.QKVRotary`): the row with q and k rotated, k and v stored. None where that does not apply."""
        if not self._one_row_kernel(x):
            return None
        from lm_torch.kernels.w4a16 import w4a16_linear

        out = w4a16_linear(
            x.reshape(1, -1).contiguous(),
            self.packed,
            self.scales,
            self.zeros,
            self.group_size,
            rotary=rope,
            tuning=self.tuning,
        )
        return out.view(*x.shape[:-1], self.out_features)

    def forward_gated(self, x: torch.Tensor, act: str) -> torch.Tensor | None:
        """act(gate) * up of this [gate | up] layer for one row on CUDA, the activation inside the W4A16 GEMV;
        None where that does not apply (the caller then runs the layer and the activation apart)."""
        if not self._one_row_kernel(x):
            return None
        from lm_torch.kernels.activation import ACTIVATION_CODES
        from lm_torch.kernels.w4a16 import w4a16_linear

        if act not in ACTIVATION_CODES:
            return None
        out = w4a16_linear(
            x.reshape(1, -1).contiguous(),
            self.packed,
            self.scales,
            self.zeros,
            self.group_size,
            act,
            tuning=self.tuning,
        )
        return out.view(*x.shape[:-1], self.out_features // 2)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class AWQLinear(_WeightOnlyLinear):
    """AutoAWQ GEMM layout, 4 bits."""

    bits = 4

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        group_size: int,
        dtype: torch.dtype = torch.float16,
        ctx: BuildContext | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, group_size, dtype, ctx)
        if out_features % 8:
            raise ValueError(f"AWQ packs 8 output channels per int32; out_features {out_features} is no multiple of 8")
        # Groups split with the inputs, unless one group spans them all (group_size -1: whole on every rank).
        group_dim = 0 if group_size != -1 else None
        self.qweight = quant_param(torch.zeros(in_features, out_features // 8, dtype=torch.int32), 1, 8, input_dim=0)
        self.qzeros = quant_param(
            torch.zeros(self.num_groups, out_features // 8, dtype=torch.int32), 1, 8, input_dim=group_dim
        )
        self.scales = quant_param(torch.zeros(self.num_groups, out_features, dtype=dtype), 1, input_dim=group_dim)

    def int4_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(q [in, out], zeros [groups, out], None): AWQ groups are contiguous."""
        return unpack_int32(self.qweight, 4, AWQ_ORDER), unpack_int32(self.qzeros, 4, AWQ_ORDER), None

    def _dequantize_checkpoint(self) -> torch.Tensor:
        q = unpack_int32(self.qweight, 4, AWQ_ORDER)  # [in, out]
        zeros = unpack_int32(self.qzeros, 4, AWQ_ORDER)  # [groups, out]
        # Inputs of one group are contiguous: view [groups, group_size, out] and broadcast the group's row.
        q = q.view(self.num_groups, self.group_size, self.out_features)
        w = (q - zeros[:, None, :]).to(self.scales.dtype) * self.scales[:, None, :]
        return w.view(self.in_features, self.out_features)

    def init_dummy(self, generator: torch.Generator) -> None:
        """Random 4-bit weights with the spread of normal(0, 0.02), for benchmarks."""
        _random_words(self.qweight, generator)
        self.qzeros.data.fill_(0x88888888 - (1 << 32))  # every 4-bit field 8, as a signed int32
        self.scales.data.fill_(0.02 / 4.6)  # uniform integers in [-8, 7] have a standard deviation of about 4.6


class GPTQLinear(_WeightOnlyLinear):
    """GPTQ layout (AutoGPTQ / GPTQModel `checkpoint_format` "gptq", or "gptq_v2"), 2, 4 or 8 bits."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        group_size: int,
        bits: int = 4,
        zero_offset: int = 1,
        dtype: torch.dtype = torch.float16,
        ctx: BuildContext | None = None,
        row_shard: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, group_size, dtype, ctx)
        if bits not in (2, 4, 8):
            raise ValueError(f"GPTQ with {bits} bits is not supported (2, 4 or 8)")
        self.bits, self.zero_offset = bits, zero_offset
        per_word = 32 // bits
        if in_features % per_word or out_features % per_word:
            raise ValueError(f"GPTQ {bits}-bit packing needs in/out features divisible by {per_word}")
        # A row-parallel rank holds its inputs' rows of qweight and g_idx, and every group's scales and zeros: with
        # act-order its inputs may belong to any group. `localize_groups` keeps only its own where they are contiguous.
        rank, size = row_shard if row_shard is not None and group_size != -1 else (0, 1)
        self.group_offset = rank * self.num_groups
        groups = self.num_groups * size
        self.qweight = quant_param(
            torch.zeros(in_features // per_word, out_features, dtype=torch.int32), 1, input_dim=0
        )
        self.qzeros = quant_param(torch.zeros(groups, out_features // per_word, dtype=torch.int32), 1, per_word)
        self.scales = quant_param(torch.zeros(groups, out_features, dtype=dtype), 1)
        default = (rank * in_features + torch.arange(in_features, dtype=torch.int32)) // self.group_size
        self.g_idx = quant_param(default, None, optional=True, input_dim=0)

    def finish_loading(self) -> None:
        """`localize_groups`, then the shared layout choice."""
        self.localize_groups()
        super().finish_loading()

    def localize_groups(self) -> None:
        """A row-parallel rank whose inputs use exactly its own groups (no act-order across shards) drops the other
        ranks' scales and zeros and numbers its groups from 0, the layout the W4A16 kernels take."""
        if self.scales.shape[0] == self.num_groups:
            return
        first, last = self.group_offset, self.group_offset + self.num_groups
        g_idx = self.g_idx.data.long()
        if g_idx.numel() and (int(g_idx.min()) < first or int(g_idx.max()) >= last):
            return  # act-order spreads this rank's inputs over other groups: dequantized through the global ids
        self.scales = quant_param(self.scales.data[first:last].contiguous(), 1)
        self.qzeros = quant_param(self.qzeros.data[first:last].contiguous(), 1, 32 // self.bits)
        self.g_idx = quant_param((g_idx - first).to(torch.int32), None, optional=True)
        self.group_offset = 0

    def int4_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(q [in, out], zeros [groups, out] with the format's offset, g_idx [in])."""
        q = unpack_int32(self.qweight.t(), 4).t()  # [in, out]
        return q, unpack_int32(self.qzeros, 4) + self.zero_offset, self.g_idx

    def _dequantize_checkpoint(self) -> torch.Tensor:
        q = unpack_int32(self.qweight.t(), self.bits).t()  # [in, out]
        zeros = unpack_int32(self.qzeros, self.bits) + self.zero_offset  # [groups, out]
        groups = self.g_idx.long()
        return (q - zeros[groups]).to(self.scales.dtype) * self.scales[groups]

    def init_dummy(self, generator: torch.Generator) -> None:
        """Random weights with the spread of normal(0, 0.02), zeros in the middle of the range, for benchmarks."""
        _random_words(self.qweight, generator)
        middle = 1 << (self.bits - 1)
        stored = torch.full((self.qzeros.shape[0], self.qzeros.shape[1] * 32 // self.bits), middle - 1)
        shifts = torch.arange(32 // self.bits) * self.bits
        words = (stored.view(stored.shape[0], -1, 32 // self.bits).long() << shifts).sum(-1)
        self.qzeros.data.copy_(torch.where(words >= 2**31, words - 2**32, words).to(torch.int32))
        self.scales.data.fill_(0.02 / (0.29 * (1 << self.bits)))  # uniform integers: std = range / sqrt(12)


def _random_words(param: torch.Tensor, generator: torch.Generator) -> None:
    words = torch.randint(-(2**31), 2**31 - 1, param.shape, generator=generator, device=param.device)
    param.data.copy_(words.to(torch.int32))
