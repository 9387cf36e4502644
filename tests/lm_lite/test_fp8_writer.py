"""What `lm lite fp8` writes: the DeepSeek-V3 / Qwen3-FP8 blocked format (float8_e4m3fn weights of every decoder
linear with float32 scales per 128 x 128 block, partial blocks at the edges), every other tensor unchanged in its
dtype, the quantization config, the tokenizer; transformers loads it (dequantizing on a machine without a GPU).
(lm-torch's loading of it is tested in tests/lm_torch/test_fp8.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lm_lite.families import family_for
from lm_lite.fp8 import quantize_blocks, quantize_fp8

E4M3_MAX = 448.0
QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
    "modules_to_not_convert": ["lm_head"],
}


def _state(path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_each_block_is_rounded_to_nearest_at_its_own_scale():
    """Checked one block at a time: scale = amax / 448 (1 for a zero block), codes = e4m3(w / scale), the block's
    largest value at 448, and dequantized values within e4m3's half step (2^-4 relative, 2^-10 * scale below 2^-6)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(200, 300, generator=gen) * torch.logspace(-3, 1, 300)  # columns of very different sizes
    weight[128:, 128:256] = 0.0  # a zero block
    q, scale = quantize_blocks(weight)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (200, 300)
    assert scale.dtype == torch.float32 and scale.shape == (2, 3)  # ceil(200 / 128), ceil(300 / 128)
    for i in range(2):
        for j in range(3):
            tile = weight[128 * i : 128 * (i + 1), 128 * j : 128 * (j + 1)]
            codes = q[128 * i : 128 * (i + 1), 128 * j : 128 * (j + 1)].float()
            amax = tile.abs().max()
            expected = amax / E4M3_MAX if amax > 0 else torch.tensor(1.0)
            assert scale[i, j] == expected, (i, j)
            assert torch.equal(codes, (tile / scale[i, j]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float())
            if amax > 0:
                assert codes.abs().max() == E4M3_MAX
            error = (codes * scale[i, j] - tile).abs()
            assert (error <= tile.abs() * 2**-4 + scale[i, j] * 2**-10).all(), (i, j)


def test_the_checkpoint_holds_the_standard_format(make_tiny, tmp_path):
    source = make_tiny("llama")
    out = quantize_fp8(source, tmp_path / "fp8")
    state, original = _state(out), _state(source)
    linears = family_for("LlamaForCausalLM").linears
    quantized = {f"model.layers.{i}.{name}.weight" for i in range(2) for name in linears}
    assert set(state) == set(original) | {name + "_scale_inv" for name in quantized}
    for name, tensor in original.items():
        if name in quantized:
            q, scale = state[name], state[name + "_scale_inv"]
            rows, cols = tensor.shape
            assert q.dtype == torch.float8_e4m3fn and q.shape == tensor.shape
            assert scale.dtype == torch.float32 and scale.shape == (-(-rows // 128), -(-cols // 128))
            want_q, want_scale = quantize_blocks(tensor)
            assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(scale, want_scale)
        else:  # embeddings, norms, the LM head: the source's tensors, in the source's dtype
            assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    config, source_config = (
        json.loads((out / "config.json").read_text()),
        json.loads((source / "config.json").read_text()),
    )
    assert config.pop("quantization_config") == QUANTIZATION_CONFIG
    assert config == source_config
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes()


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "phi3", "gemma3_multimodal"])
def test_transformers_loads_every_family_dequantized(make_tiny, tmp_path, family):
    """Every decoder linear of the family's table is quantized (Phi-3's fused ones as one tensor each), nothing else
    (not the vision tower); transformers loads the checkpoint, its linears holding the dequantized weights."""
    import transformers
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    source = make_tiny(family)
    out = quantize_fp8(source, tmp_path / family)
    config = json.loads((source / "config.json").read_text())
    state = _state(out)
    scales = sorted(name for name in state if name.endswith("weight_scale_inv"))
    layers = (config.get("text_config") or config)["num_hidden_layers"]
    assert len(scales) == layers * len(family_for(config["architectures"][0]).linears)
    assert not any("vision" in name or "lm_head" in name for name in scales)
    auto = (
        transformers.AutoModelForImageTextToText if family == "gemma3_multimodal" else transformers.AutoModelForCausalLM
    )
    model = auto.from_pretrained(out, dtype=torch.float32)
    weights = dict(model.named_parameters())
    for name in scales:
        module = name.removesuffix(".weight_scale_inv")
        want = _dequantize_fp8_weight(state[f"{module}.weight"], state[name], [128, 128], torch.float32)
        key = f"{module}.weight"
        key = key if key in weights else key.replace("language_model.model.", "model.language_model.")  # Gemma 3's
        assert torch.equal(weights[key], want), module


def test_internlm2_and_non_empty_work_dirs_are_refused(make_tiny, tmp_path):
    with pytest.raises(ValueError, match="InternLM2"):
        quantize_fp8(make_tiny("internlm2"), tmp_path / "internlm2")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    with pytest.raises(ValueError, match="is not empty"):
        quantize_fp8(make_tiny("llama"), tmp_path / "used")


def test_the_cli_command(make_tiny, tmp_path):
    out = tmp_path / "out"
    script = [sys.executable, "-c", "from lm_lite.cli import main; main()"]
    result = subprocess.run(
        [*script, "fp8", str(make_tiny("llama")), "--work-dir", str(out)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {out}"
    assert json.loads((out / "config.json").read_text())["quantization_config"] == QUANTIZATION_CONFIG
    again = subprocess.run(
        [*script, "fp8", str(make_tiny("llama")), "--work-dir", str(out)], capture_output=True, text=True
    )
    assert again.returncode == 1
    assert len(again.stderr.strip().splitlines()) == 1 and "--overwrite" in again.stderr
    listed = subprocess.run([*script, "--help"], capture_output=True, text=True).stdout
    assert "fp8" in listed
