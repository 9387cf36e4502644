"""`lm model info` on checkpoints lm-lite writes: the parameter count is the model's, not the number of stored
words (a packed int32 `qweight` holds 32 / bits weights; scales and zero points are no parameters)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

import lm_lite


def _info(model_dir) -> dict[str, str]:
    code = "import sys; sys.modules['lm_torch'] = None; from lm_core.cli import main; main()"
    result = subprocess.run(
        [sys.executable, "-c", code, "model", "info", str(model_dir)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in result.stdout.splitlines())


@pytest.mark.slow
def test_model_info_counts_the_parameters_of_a_quantized_checkpoint(default_model_dir, tmp_path):
    from safetensors import safe_open

    with safe_open(default_model_dir / "model.safetensors", framework="pt") as f:
        reference = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    work_dir = lm_lite.rtn(default_model_dir, tmp_path / "rtn", w_bits=4)
    info = _info(work_dir)
    assert info["parameters"] == f"{reference / 1e6:.1f}M"
    assert info["quantization"] == "awq (bits 4, group_size 64)"
    assert "I32" in info["weight dtype"]


def _numel(shape: list[int]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total
