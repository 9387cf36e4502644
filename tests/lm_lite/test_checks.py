"""Bad input fails with a clear message before any long work: each case uses a model directory holding only
config.json (or a valid one where the check needs shapes), so getting as far as loading weights would fail
differently."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import lm_lite


@pytest.fixture()
def config_only(tmp_path, make_tiny):
    """A directory with the tiny Llama's config.json and nothing else."""
    path = tmp_path / "config_only"
    path.mkdir()
    (path / "config.json").write_text((make_tiny("llama") / "config.json").read_text())
    return path


@pytest.mark.parametrize("function", [lm_lite.auto_awq, lm_lite.auto_gptq, lm_lite.smooth_quant, lm_lite.calibrate])
def test_unsupported_architecture_is_named_with_the_supported_ones(function, tmp_path):
    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"'GPT2LMHeadModel' is not supported by lm-lite \(supported: .*Qwen2"):
        function(model, tmp_path / "out")


@pytest.mark.parametrize("function", [lm_lite.auto_awq, lm_lite.auto_gptq])
def test_group_size_that_does_not_divide_names_the_linear_and_the_valid_sizes(function, config_only, tmp_path):
    with pytest.raises(ValueError, match=r"w_group_size=48 does not divide in_features=64 of self_attn.q_proj.*32, 64"):
        function(config_only, tmp_path / "out", w_group_size=48)


def test_missing_calibration_file(config_only, tmp_path):
    with pytest.raises(ValueError, match=r"calib_dataset '.*missing.jsonl': no such file"):
        lm_lite.auto_awq(config_only, tmp_path / "out", w_group_size=32, calib_dataset=str(tmp_path / "missing.jsonl"))


def test_non_empty_work_dir_needs_overwrite(config_only, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(
        ValueError, match=r"work_dir '.*out' is not empty \(model.safetensors, notes.txt\); pass overwrite"
    ):
        lm_lite.auto_gptq(config_only, out, w_group_size=32)
    # With overwrite the checks pass, a previous run's weights go, other files stay; loading then fails (no
    # tokenizer, no weights in this directory).
    with pytest.raises((OSError, ValueError)) as failure:
        lm_lite.auto_gptq(config_only, out, w_group_size=32, overwrite=True)
    assert "work_dir" not in str(failure.value)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"calib_samples": 0}, "calib_samples"),
        ({"calib_seqlen": -1}, "calib_seqlen"),
        ({"batch_size": 1.5}, "batch_size"),
        ({"device": "tpu"}, "device"),
        ({"w_bits": 3}, "w_bits"),
        ({"w_group_size": 0}, "w_group_size"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field, config_only, tmp_path):
    with pytest.raises(ValueError, match=field):
        lm_lite.auto_awq(config_only, tmp_path / "out", **{"w_group_size": 32, **kwargs})


def test_smooth_quant_arguments(config_only, tmp_path):
    with pytest.raises(ValueError, match="alpha"):
        lm_lite.smooth_quant(config_only, tmp_path / "out", alpha=1.5)
    with pytest.raises(ValueError, match="quant_dtype"):
        lm_lite.smooth_quant(config_only, tmp_path / "out", quant_dtype="int4")


def test_cli_reports_one_line_errors_and_help_imports_no_torch(config_only, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("")
    script = [sys.executable, "-c", "from lm_lite.cli import main; main()"]
    result = subprocess.run(
        [*script, "auto_awq", str(config_only), "--work-dir", str(out), "--w-group-size", "32"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: work_dir '{out}' is not empty (x); pass overwrite=True (--overwrite) to write over it"
    ]
    code = (
        "import sys\nfrom lm_lite.cli import lite\ntry:\n    lite(['auto_gptq', '--help'])\n"
        "except SystemExit:\n    pass\nprint('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip().endswith("False")


def _smollm2_config_only(tmp_path, make_tiny):
    """The tiny Llama's config.json with SmolLM2-135M's widths: 576 inputs (not a multiple of 128) and 1536."""
    config = json.loads((make_tiny("llama") / "config.json").read_text())
    config.update(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    path = tmp_path / "smol_config_only"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("command", ["auto_awq", "auto_gptq"])
def test_default_group_size_is_one_that_fits_the_model(command, tmp_path, make_tiny):
    model = _smollm2_config_only(tmp_path, make_tiny)
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("")
    script = [sys.executable, "-c", "from lm_lite.cli import main; main()"]
    result = subprocess.run([*script, command, str(model), "--work-dir", str(out)], capture_output=True, text=True)
    # Past the group-size check (128 does not divide 576; 64 divides both), on to the next one.
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert lines[0] == "lm-lite: w_group_size 64 (the largest of 128, 64, 32 that fits this model)"
    assert lines[1].startswith(f"Error: work_dir '{out}' is not empty")


def test_no_fitting_group_size_names_the_dimensions(tmp_path, make_tiny):
    from lm_lite.families import family_for, pick_group_size

    config = json.loads((make_tiny("llama") / "config.json").read_text())
    config.update(hidden_size=100, intermediate_size=300, num_attention_heads=4, num_key_value_heads=2, head_dim=25)
    with pytest.raises(ValueError, match=r"none of the group sizes 128, 64, 32 divides .* \(100, 300\).*-1"):
        pick_group_size(config, family_for(config["architectures"][0]))
