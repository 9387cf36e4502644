"""lm-lite alone (no lm-torch in the environment: the `tests-lm-lite` nox session installs lm-core and lm-lite only)
quantizes the default model from the command line, and the checkpoint holds the standard GPTQ layout.

The check of the checkpoint is independent of lm-lite's writer: the packed tensors are unpacked here in plain torch
(the GPTQ layout: 4-bit fields in order along the input dimension, zeros stored minus one) and the dequantized
weights must stay close to the original float weights. GPTQ moves weights beyond plain rounding to make up for the
error of the columns before them, so the bound is loose; random or misplaced values would be far off.
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch


def _fields(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """Unpack 8 4-bit fields per int32 along `dim` (0: rows, 1: columns), lowest bits first."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    if dim == 0:  # [rows / 8, cols] -> [rows, cols]
        return ((packed.unsqueeze(1) >> shifts[None, :, None]) & 0xF).flatten(0, 1)
    return ((packed.unsqueeze(-1) >> shifts) & 0xF).flatten(-2)  # [rows, cols / 8] -> [rows, cols]


def test_lm_lite_alone_quantizes_the_default_model(default_model_dir, tmp_path):
    from safetensors.torch import load_file

    work_dir = tmp_path / "gptq"
    # The `lm-lite` console script, through the interpreter running the tests (its bin/ may not be on PATH), with
    # lm-torch made unimportable: lm-lite must not need it (the lm-lite nox session does not even install it).
    code = "import sys; sys.modules['lm_torch'] = None; from lm_lite.cli import main; main()"
    cmd = [sys.executable, "-c", code, "auto_gptq", str(default_model_dir)]
    cmd += ["--work-dir", str(work_dir), "--w-group-size", "64", "--no-desc-act", "--sym"]
    cmd += ["--calib-samples", "4", "--calib-seqlen", "128", "--device", "cpu"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-2000:]

    quant = json.loads((work_dir / "config.json").read_text())["quantization_config"]
    assert (quant["quant_method"], quant["bits"], quant["group_size"], quant["desc_act"]) == ("gptq", 4, 64, False)
    zero_offset = 1 if quant.get("checkpoint_format", "gptq") == "gptq" else 0
    state, original = {}, {}
    for file in work_dir.glob("*.safetensors"):
        state.update(load_file(file))
    for file in default_model_dir.glob("*.safetensors"):
        original.update(load_file(file))
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        prefix = f"model.layers.3.{name}"
        weight = original[f"{prefix}.weight"].float()  # [out, in]
        out_features, in_features = weight.shape
        qweight, qzeros, scales = state[f"{prefix}.qweight"], state[f"{prefix}.qzeros"], state[f"{prefix}.scales"]
        assert qweight.dtype == torch.int32 and qweight.shape == (in_features // 8, out_features)
        assert qzeros.shape == (in_features // 64, out_features // 8) and scales.shape == (
            in_features // 64,
            out_features,
        )
        q = _fields(qweight, 0).float()  # [in, out]
        zeros = (_fields(qzeros, 1) + zero_offset).float().repeat_interleave(64, 0)
        step = scales.float().repeat_interleave(64, 0)
        dequant = ((q - zeros) * step).t()  # [out, in]
        relative = (dequant - weight).norm() / weight.norm()
        # Plain 4-bit rounding in groups of 64 gives about 0.1 here; GPTQ's updates add some, never 2x.
        assert relative < 0.2, (name, relative.item())
        assert ((dequant - weight).abs() / step.t()).mean() < 1.0
