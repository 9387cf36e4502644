"""Quantized checkpoints written by lm-lite, split over tensor-parallel ranks on the CPU: AWQ, GPTQ and W8A8 at tp 2
and 4 give the logits of the unsplit quantized model (the same integer weights, scales and zeros, read in parts);
the int8 KV cache too. A group size that leaves a rank part of a group is refused, naming tp.

The ranks are gloo processes, as in `tests/lm_torch/test_tensor_parallel.py`; each builds the model from the
checkpoint with its `TPGroup` and runs the paged forward of `tests/lm_torch/test_model_families.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

lm_lite = pytest.importorskip("lm_lite")
pytest.importorskip("lm_torch")

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "lm_torch"))  # for the rank processes: see tests/lm_torch/tp_ranks.py
import tp_ranks  # noqa: E402

TOLERANCE = 1e-4
CALIB = {"calib_samples": 2, "calib_seqlen": 64, "device": "cpu"}
CALIB_TEXT = (HERE.parents[1] / "packages" / "lm-lite" / "src" / "lm_lite" / "data" / "calib_builtin.txt").read_text()


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIB_TEXT[:20000], encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, default_model_dir, calib_file, tiny_models):
    """{name: (checkpoint, engine config)}: lm-lite's AWQ and GPTQ (group 32) and W8A8 of a tiny Llama, and the
    float checkpoint with the int8 KV cache."""
    base = tiny_models.make_tiny("llama", tmp_path_factory.mktemp("llama"), default_model_dir)
    work = tmp_path_factory.mktemp("quant")
    awq = lm_lite.auto_awq(base, work / "awq", w_group_size=32, calib_dataset=calib_file, **CALIB)
    gptq = lm_lite.auto_gptq(base, work / "gptq", w_group_size=32, calib_dataset=calib_file, **CALIB)
    w8a8 = lm_lite.smooth_quant(base, work / "w8a8", calib_dataset=calib_file, **CALIB)
    return {
        "awq": (awq, {}),
        "gptq": (gptq, {}),
        "w8a8": (w8a8, {}),
        "kv-int8": (base, {"quant_policy": 8}),
        "kv-int4": (base, {"quant_policy": 4}),
    }


@pytest.fixture(scope="module")
def split_logits(checkpoints):
    whole = {name: tp_ranks.model_logits(path, None, engine) for name, (path, engine) in checkpoints.items()}
    jobs2 = [(name, path, None, engine) for name, (path, engine) in checkpoints.items()]
    # At tp 4 o_proj's 64 inputs leave 16 to a rank: half a group of 32 (refused, below); W8A8 and the KV cache split.
    jobs4 = [job for job in jobs2 if job[0] in ("w8a8", "kv-int8", "kv-int4")]
    return whole, {2: tp_ranks.run_ranks(2, jobs2), 4: tp_ranks.run_ranks(4, jobs4)}


@pytest.mark.parametrize(
    ("name", "size"),
    [("awq", 2), ("gptq", 2), ("w8a8", 2), ("w8a8", 4), ("kv-int8", 2), ("kv-int8", 4), ("kv-int4", 2), ("kv-int4", 4)],
)
def test_split_quantized_logits_match_the_unsplit_model(split_logits, name, size):
    whole, split = split_logits
    diff = (split[size][name] - whole[name]).abs().max().item()
    assert diff < TOLERANCE, f"{name} tp {size}: {diff:.3g} from tp 1"
    assert whole[name].std(dim=0).mean() > 1000 * TOLERANCE


def test_a_group_split_between_ranks_is_refused(checkpoints):
    from lm_torch.distributed.group import TPGroup

    path, engine = checkpoints["awq"]
    # The layers are built before any collective runs: a TPGroup of 4 without process groups is enough.
    with pytest.raises(ValueError, match=r"group_size 32 does not divide the 16 input channels .* \(tp 4\)"):
        tp_ranks.model_logits(path, None, engine, TPGroup(rank=0, size=4))
