"""lm-torch's quantized linears and their loading, against checkpoints packed here by the formats' definitions.

The packers below are written from the layouts' specifications, one integer at a time, independently of lm-lite's
(vectorised) ones; the reference is plain torch on the dense weights they encode.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lm_torch.config import TorchEngineConfig
from lm_torch.layers.quant import AWQLinear, GPTQLinear, W8A8Linear, parse_quant_config
from lm_torch.loader import build_model, load_hf_config

transformers = pytest.importorskip("transformers")

AWQ_NIBBLE_COLUMN = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of an AWQ word holds column 8j + AWQ_NIBBLE_COLUMN[k]


def _word(values: list[int], bits: int) -> int:
    word = 0
    for k, value in enumerate(values):
        word |= value << (bits * k)
    return word - (1 << 32) if word >= 1 << 31 else word


def awq_tensors(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """q [in, out], zeros [groups, out] ints in [0, 16); scales [groups, out] -> AutoAWQ GEMM tensors."""

    def pack(matrix):
        rows, cols = matrix.shape
        return torch.tensor(
            [
                [_word([int(matrix[r, 8 * j + AWQ_NIBBLE_COLUMN[k]]) for k in range(8)], 4) for j in range(cols // 8)]
                for r in range(rows)
            ],
            dtype=torch.int32,
        )

    return {"qweight": pack(q), "qzeros": pack(zeros), "scales": scales.half()}


def gptq_tensors(q, zeros, scales, g_idx, bits) -> dict[str, torch.Tensor]:
    """q [in, out], zeros [groups, out] -> GPTQ v1 tensors (inputs packed in order, zeros stored minus one)."""
    per = 32 // bits
    in_features, out_features = q.shape
    qweight = torch.tensor(
        [
            [_word([int(q[per * i + k, o]) for k in range(per)], bits) for o in range(out_features)]
            for i in range(in_features // per)
        ],
        dtype=torch.int32,
    )
    qzeros = torch.tensor(
        [
            [_word([int(zeros[g, per * j + k]) - 1 for k in range(per)], bits) for j in range(out_features // per)]
            for g in range(zeros.shape[0])
        ],
        dtype=torch.int32,
    )
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales.half(), "g_idx": g_idx.to(torch.int32)}


def _random_quantized(in_features, out_features, groups, bits, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (in_features, out_features), generator=g)
    zeros = torch.randint(1, 2**bits, (groups, out_features), generator=g)
    scales = (0.01 + 0.02 * torch.rand(groups, out_features, generator=g)).half().float()
    return q, zeros, scales


def _load(module: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    with torch.no_grad():
        for name, tensor in tensors.items():
            getattr(module, name).copy_(tensor)
    module.finish_loading()
    return module


@pytest.mark.parametrize("cache_dense", [True, False])
def test_awq_linear_computes_with_the_weights_it_encodes(cache_dense):
    q, zeros, scales = _random_quantized(64, 48, 2, 4, seed=0)
    layer = AWQLinear(64, 48, bias=True, group_size=32, dtype=torch.float32)
    layer.cache_dense = cache_dense
    bias = torch.randn(48)
    _load(layer, {**awq_tensors(q, zeros, scales), "bias": bias})
    dense = (q - zeros.repeat_interleave(32, dim=0)) * scales.repeat_interleave(32, dim=0)  # [in, out]
    assert torch.equal(layer.dequantize(), dense)
    x = torch.randn(3, 5, 64)
    assert torch.allclose(layer(x), x @ dense + bias, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gptq_linear_with_act_order_groups(bits):
    q, zeros, scales = _random_quantized(64, 32, 4, bits, seed=bits)
    g_idx = (torch.arange(64) // 16)[torch.randperm(64, generator=torch.Generator().manual_seed(1))]
    layer = _load(
        GPTQLinear(64, 32, bias=False, group_size=16, bits=bits, dtype=torch.float32),
        gptq_tensors(q, zeros, scales, g_idx, bits),
    )
    dense = (q - zeros[g_idx]) * scales[g_idx]
    assert torch.equal(layer.dequantize(), dense)
    x = torch.randn(7, 64)
    assert torch.allclose(layer(x), x @ dense, atol=1e-5)


def test_w8a8_linear_matches_per_token_int8_in_float64():
    g = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (40, 64), generator=g).to(torch.int8)
    scale = 0.001 + 0.01 * torch.rand(40, 1, generator=g)
    layer = _load(
        W8A8Linear(64, 40, bias=False, quant_dtype="int8", dtype=torch.float32), {"weight": weight, "scale": scale}
    )
    x = torch.randn(9, 64, generator=g) * (1 + 10 * (torch.arange(64) == 3))  # one outlier channel
    x_scale = x.double().abs().amax(-1, keepdim=True) / 127
    x_q = torch.round(x.double() / x_scale)
    expected = (x_q @ weight.double().t()) * x_scale * scale.double().t()
    assert torch.allclose(layer(x).double(), expected, rtol=1e-5, atol=1e-6)
    # One token at a time (decode) gives the same rows.
    assert torch.allclose(layer(x[:1]), layer(x)[:1])


def test_w8a8_float8_weights():
    g = torch.Generator().manual_seed(1)
    dense = torch.randn(16, 32, generator=g)
    scale = dense.abs().amax(1, keepdim=True) / 448
    weight = (dense / scale).to(torch.float8_e4m3fn)
    layer = _load(
        W8A8Linear(32, 16, bias=False, quant_dtype="float8_e4m3fn", dtype=torch.float32),
        {"weight": weight, "scale": scale},
    )
    x = torch.randn(4, 32, generator=g)
    x_scale = x.abs().amax(-1, keepdim=True) / 448
    expected = ((x / x_scale).to(torch.float8_e4m3fn).float() @ weight.float().t()) * x_scale * scale.t()
    assert torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-6)


# -- whole checkpoints ----------------------------------------------------------------------------------------------

TINY = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
# Wide enough for the one-row tensor-core W4A16 GEMV (groups of 64) and its folded steps: the MLP's activation and,
# with head_dim 64, rotary + KV store (what a Llama-3-8B decode step runs).
WIDE = {**TINY, "hidden_size": 256, "intermediate_size": 512}


def _projections(config: dict) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each decoder linear of a Llama config."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    return {
        "q_proj": (hidden, hidden),
        "k_proj": (kv, hidden),
        "v_proj": (kv, hidden),
        "o_proj": (hidden, hidden),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }


def _quantized_llama(path, method: str, g_idx_per_projection=False, wide=False):
    """A tiny Llama checkpoint whose decoder linears are random AWQ or GPTQ integers (groups of 32; `wide`: the
    WIDE shape, groups of 64); returns the transformers model holding the weights they encode."""
    from safetensors.torch import save_file

    config, group = (WIDE, 64) if wide else (TINY, 32)
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    for i in range(config["num_hidden_layers"]):
        for seed, (name, (out_features, in_features)) in enumerate(_projections(config).items()):
            module = f"model.layers.{i}.{'self_attn' if name[0] in 'qkvo' else 'mlp'}.{name}"
            groups = in_features // group
            q, zeros, scales = _random_quantized(in_features, out_features, groups, 4, seed=100 * i + seed)
            if method == "awq":
                g_idx = torch.arange(in_features) // group
                tensors = awq_tensors(q, zeros, scales)
            else:
                order_seed = 100 * i + seed if g_idx_per_projection else 7
                g_idx = (torch.arange(in_features) // group)[
                    torch.randperm(in_features, generator=torch.Generator().manual_seed(order_seed))
                ]
                tensors = gptq_tensors(q, zeros, scales, g_idx, 4)
            del state[f"{module}.weight"]
            state.update({f"{module}.{k}": v for k, v in tensors.items()})
            with torch.no_grad():
                reference.get_submodule(module).weight.copy_(((q - zeros[g_idx]) * scales[g_idx]).t())
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    saved = json.loads(reference.config.to_json_string())
    saved["architectures"] = ["LlamaForCausalLM"]
    saved["quantization_config"] = (
        {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": group, "zero_point": True}
        if method == "awq"
        else {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": True, "sym": False}
    )
    (path / "config.json").write_text(json.dumps(saved))
    return reference


def _our_logits(path, ids, **engine):
    from lm_torch.attention import StepMetadata, TorchAttentionBackend

    config = TorchEngineConfig(**engine)
    cpu = torch.device("cpu")
    model = build_model(path, config, load_hf_config(path), cpu, torch.float32, TorchAttentionBackend())
    caches = [(torch.zeros(4, 16, h, d), torch.zeros(4, 16, h, d)) for h, d in model.kv_cache_shape()]
    meta = model.prepare_attention(StepMetadata.build([len(ids)], [len(ids)], [[0, 1]], 16, "cpu"))
    with torch.no_grad():
        return model, model.compute_logits(model(ids, torch.arange(len(ids)), caches, meta))


@pytest.mark.parametrize("method", ["awq", "gptq", "awq-wide"])
def test_fused_projections_load_packed_columns_in_place(method, tmp_path):
    """q/k/v and gate/up fuse along the output channels: AWQ's packed columns, GPTQ's unpacked ones."""
    reference = _quantized_llama(tmp_path, method.removesuffix("-wide"), wide=method.endswith("-wide"))
    ids = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
    model, ours = _our_logits(tmp_path, ids)
    assert isinstance(model.layers[0].self_attn.qkv_proj, GPTQLinear if method == "gptq" else AWQLinear)
    assert (ours - expected).abs().max().item() < 1e-4


def test_fused_gptq_projections_must_share_their_group_order(tmp_path):
    _quantized_llama(tmp_path, "gptq", g_idx_per_projection=True)
    with pytest.raises(ValueError, match="disagree"):
        _our_logits(tmp_path, torch.arange(4))


def test_dummy_weights_of_a_quantized_config(tmp_path):
    _quantized_llama(tmp_path, "awq")
    model, logits = _our_logits(tmp_path, torch.arange(10), load_format="dummy")
    assert torch.isfinite(logits).all()
    weight = model.layers[0].mlp.gate_up_proj.dequantize()
    assert 0.01 < weight.std().item() < 0.04  # about the normal(0, 0.02) of dense dummy weights


@pytest.mark.parametrize(
    ("quantization_config", "message"),
    [
        ({"quant_method": "fp8"}, "quant_method 'fp8' is not supported"),
        ({"quant_method": "awq", "version": "gemv", "bits": 4, "group_size": 128}, "version 'gemv'"),
        ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits=3"),
        ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
    ],
)
def test_unsupported_quantization_configs_are_named(quantization_config, message):
    config = transformers.LlamaConfig(**TINY)
    config.quantization_config = quantization_config
    with pytest.raises(ValueError, match=message):
        parse_quant_config(config)


# -- the CUDA path: repacked W4A16 kernels and the W8A8 kernels, against the CPU path and transformers ---------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _w8a8_llama(path):
    """A tiny Llama checkpoint in SmoothQuant's layout (int8 weights per output channel); returns the transformers
    model holding the weights they encode (activations are quantized at run time, which no dense model does)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    for i in range(TINY["num_hidden_layers"]):
        for name, (out_features, in_features) in _projections(TINY).items():
            module = f"model.layers.{i}.{'self_attn' if name[0] in 'qkvo' else 'mlp'}.{name}"
            weight = torch.randint(-127, 128, (out_features, in_features), generator=gen).to(torch.int8)
            scale = (0.0005 + 0.001 * torch.rand(out_features, 1, generator=gen)) * 8 / in_features**0.5
            state[f"{module}.weight"] = weight
            state[f"{module}.scale"] = scale
            with torch.no_grad():
                reference.get_submodule(module).weight.copy_(weight.float() * scale)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    config = json.loads(reference.config.to_json_string())
    config["architectures"] = ["LlamaForCausalLM"]
    config["quantization_config"] = {"quant_method": "smooth_quant", "quant_dtype": "int8"}
    (path / "config.json").write_text(json.dumps(config))
    return reference


def _cuda_logits(path, ids, dtype):
    from lm_torch.attention import StepMetadata, TorchAttentionBackend

    device = torch.device("cuda")
    model = build_model(path, TorchEngineConfig(), load_hf_config(path), device, dtype, TorchAttentionBackend())
    caches = [
        (torch.zeros(4, 16, h, d, device=device, dtype=dtype), torch.zeros(4, 16, h, d, device=device, dtype=dtype))
        for h, d in model.kv_cache_shape()
    ]
    meta = model.prepare_attention(StepMetadata.build([len(ids)], [len(ids)], [[0, 1]], 16, "cuda"))
    with torch.no_grad():
        hidden = model(ids.cuda(), torch.arange(len(ids), device=device), caches, meta)
        return model, model.compute_logits(hidden).float().cpu()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["awq", "gptq", "w8a8"])
def test_cuda_kernels_give_the_logits_of_the_cpu_path(method, dtype, tmp_path):
    """Prefill (20 tokens: the tensor-core kernels) and one token (the W4A16 GEMV, the skinny int8 GEMM): the CUDA
    model's logits equal the CPU float32 path's within 2% (fp16) / 5% (bf16) of the largest logit."""
    pytest.importorskip("triton")
    _w8a8_llama(tmp_path) if method == "w8a8" else _quantized_llama(tmp_path, method)
    tolerance = 0.02 if dtype == torch.float16 else 0.05
    for length in (20, 1):
        ids = torch.randint(0, 128, (length,), generator=torch.Generator().manual_seed(length))
        _, expected = _our_logits(tmp_path, ids)
        model, got = _cuda_logits(tmp_path, ids, dtype)
        proj = model.layers[0].mlp.gate_up_proj
        if method == "w8a8":
            assert proj.weight_t is None  # the Triton kernels, not the CPU's transposed copy
        else:
            assert proj.packed is not None and not hasattr(proj, "qweight")
            assert (proj.input_perm is not None) == (method == "gptq")  # act-order undone by a permutation
        error = (got - expected).abs().max().item()
        scale = expected.abs().max().item()
        print(f"{method} {dtype} {length} tokens: max |logit error| {error:.4f} of max |logit| {scale:.3f}")
        assert error <= tolerance * scale


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", ["awq", "gptq", "w8a8", "awq-wide"])
def test_engine_decodes_a_quantized_checkpoint_with_cuda_graphs(method, tmp_path):
    """Greedy decoding through the engine (decode steps replayed from CUDA graphs) follows transformers running the
    fake-quantized weights in float32, up to steps whose two best logits are closer than fp16 can tell apart.
    awq-wide: groups of 64 and head_dim 64, so decode steps run the tensor-core GEMV with the activation folded into
    gate_up and rotary + KV store folded into qkv."""
    pytest.importorskip("triton")
    import asyncio

    from lm_core.engine import EngineRequest
    from lm_core.generation_config import GenerationConfig
    from lm_torch.engine import TorchEngine

    if method == "w8a8":
        reference = _w8a8_llama(tmp_path)
    else:
        reference = _quantized_llama(tmp_path, method.removesuffix("-wide"), wide=method.endswith("-wide"))
    engine = TorchEngine.from_pretrained(
        tmp_path, {"device": "cuda", "dtype": "float16", "max_batch_size": 4, "num_kv_blocks": 32}
    )
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 125, (n,), generator=gen).tolist() for n in (5, 17, 30)]

    async def generate(prompt):
        ids = []
        cfg = GenerationConfig(max_new_tokens=16, ignore_eos=True)
        async for out in engine.generate(EngineRequest(f"r{len(prompt)}", prompt, cfg)):
            ids += out.token_ids
        return ids

    for prompt in prompts:
        ours = asyncio.run(generate(prompt))
        ids = torch.tensor([prompt])
        for step, token in enumerate(ours):
            with torch.no_grad():
                logits = reference(ids).logits[0, -1]
            top2 = torch.topk(logits, 2)
            if token != top2.indices[0].item():
                gap = (top2.values[0] - top2.values[1]).item()
                assert gap < 0.05 * logits.abs().max().item(), f"step {step}: {token} != {top2.indices[0].item()}"
                break  # a near tie: the continuations may rightly differ from here
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert engine.runner.graphs is not None and engine.runner.graphs.num_replays > 0
    asyncio.run(engine.close())
