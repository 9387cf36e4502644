"""What lm-lite writes: standard layouts that transformers' quantization configs parse, tensors that unpack to the
weights lm-lite quantized, InternLM2 back in its own names, calibration statistics saved and reused.
(That lm-torch runs these checkpoints is tested in tests/integration/test_quantization.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lm_lite
from lm_lite.packing import unpack_awq, unpack_gptq

CALIB = {"calib_samples": 2, "calib_seqlen": 64}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _transformers_quant_config(path):
    from transformers import AutoConfig
    from transformers.quantizers.auto import AutoQuantizationConfig

    config = AutoConfig.from_pretrained(path)
    return AutoQuantizationConfig.from_dict(config.quantization_config)


def _distinct_per_group(dense: torch.Tensor, group_size: int) -> int:
    groups = dense.reshape(dense.shape[0], -1, group_size)
    return max(len(torch.unique(groups[r, g])) for r in range(groups.shape[0]) for g in range(groups.shape[1]))


def test_awq_checkpoint(make_tiny, calib_file, tmp_path):
    out = lm_lite.auto_awq(make_tiny("llama"), tmp_path / "awq", w_group_size=32, calib_dataset=calib_file, **CALIB)
    parsed = _transformers_quant_config(out)
    assert type(parsed).__name__ == "AwqConfig"
    assert (parsed.bits, parsed.group_size, parsed.zero_point, str(parsed.format).lower()) == (4, 32, True, "gemm")
    state = load_file(out / "model.safetensors")
    for name in LINEARS:
        module = f"model.layers.1.{'self_attn' if name[0] in 'qkvo' else 'mlp'}.{name}"
        assert f"{module}.weight" not in state
        qweight, qzeros, scales = (state[f"{module}.{k}"] for k in ("qweight", "qzeros", "scales"))
        assert qweight.dtype == torch.int32 and scales.dtype == torch.float16
        dense = unpack_awq(qweight, qzeros, scales, 32)
        assert dense.shape[1] == qweight.shape[0] and dense.shape[0] == 8 * qweight.shape[1]
        assert _distinct_per_group(dense, 32) <= 16
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"} <= set(state)
    assert (out / "tokenizer.json").is_file()


def test_gptq_checkpoint_with_act_order(make_tiny, calib_file, tmp_path):
    out = lm_lite.auto_gptq(
        make_tiny("qwen2"), tmp_path / "gptq", w_group_size=32, desc_act=True, calib_dataset=calib_file, **CALIB
    )
    parsed = _transformers_quant_config(out)
    assert type(parsed).__name__ == "GPTQConfig"
    assert (parsed.bits, parsed.group_size, parsed.desc_act, parsed.sym) == (4, 32, True, True)
    state = load_file(out / "model.safetensors")
    prefix = "model.layers.0.self_attn"
    g_idx = [state[f"{prefix}.{p}.g_idx"] for p in ("q_proj", "k_proj", "v_proj")]
    # q, k and v share one Hessian, hence one column order: loaders may fuse them.
    assert torch.equal(g_idx[0], g_idx[1]) and torch.equal(g_idx[0], g_idx[2])
    assert not torch.equal(g_idx[0].long(), torch.arange(64) // 32)
    assert (state[f"{prefix}.q_proj.qzeros"] == 0x77777777).all()  # symmetric: zero point 8, stored as 7
    assert state[f"{prefix}.q_proj.bias"].dtype == torch.float16  # Qwen2's q/k/v biases travel
    dense = unpack_gptq(
        state[f"{prefix}.q_proj.qweight"],
        state[f"{prefix}.q_proj.qzeros"],
        state[f"{prefix}.q_proj.scales"],
        g_idx[0],
        4,
    )
    assert dense.shape == (64, 64)


@pytest.mark.parametrize("quant_dtype", ["int8", "float8_e4m3fn"])
def test_smooth_quant_checkpoint(quant_dtype, make_tiny, calib_file, tmp_path):
    out = lm_lite.smooth_quant(
        make_tiny("gemma"), tmp_path / "sq", quant_dtype=quant_dtype, calib_dataset=calib_file, **CALIB
    )
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "smooth_quant", "quant_dtype": quant_dtype, "alpha": 0.5}
    state = load_file(out / "model.safetensors")
    weight, scale = state["model.layers.0.mlp.down_proj.weight"], state["model.layers.0.mlp.down_proj.scale"]
    assert weight.dtype == getattr(torch, quant_dtype) and weight.shape == (64, 128)
    assert scale.dtype == torch.float32 and scale.shape == (64, 1)
    assert (out / "calibration" / "stats.safetensors").is_file()


def test_calibrate_saves_statistics_that_smooth_quant_reuses(make_tiny, calib_file, tmp_path):
    work = tmp_path / "work"
    stats_path = lm_lite.calibrate(make_tiny("llama"), work, calib_dataset=calib_file, **CALIB)
    stats = load_file(stats_path)
    absmax = stats["model.layers.0.self_attn.q_proj.absmax"]
    assert absmax.shape == (64,) and (absmax > 0).all()
    assert (stats["model.layers.1.mlp.down_proj.absmean"] <= stats["model.layers.1.mlp.down_proj.absmax"]).all()
    written = stats_path.stat().st_mtime_ns
    # The work dir holds only statistics: no overwrite needed, and the matching statistics are not recomputed.
    lm_lite.smooth_quant(make_tiny("llama"), work, calib_dataset=calib_file, **CALIB)
    assert stats_path.stat().st_mtime_ns == written
    lm_lite.smooth_quant(
        make_tiny("llama"), work, calib_dataset=calib_file, calib_samples=3, calib_seqlen=64, overwrite=True
    )
    assert stats_path.stat().st_mtime_ns != written  # other settings: computed again


def test_internlm2_is_written_in_its_own_layout(make_tiny, calib_file, tmp_path):
    out = lm_lite.auto_awq(make_tiny("internlm2"), tmp_path / "awq", w_group_size=32, calib_dataset=calib_file, **CALIB)
    state = load_file(out / "model.safetensors")
    assert state["model.layers.0.attention.wqkv.qweight"].shape == (64, (64 + 2 * 32) // 8)
    assert state["model.layers.0.attention.wqkv.bias"].shape == (128,)
    assert {"model.tok_embeddings.weight", "output.weight", "model.layers.0.feed_forward.w2.qweight"} <= set(state)
    assert not any("q_proj" in name or "self_attn" in name for name in state)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["InternLM2ForCausalLM"]
