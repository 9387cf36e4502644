"""lm-lite's checkpoints run in lm-torch: logits of every family against the fake-quantized reference, and the
perplexity table's bounds on the default model.

The reference is built independently of lm-torch: transformers' own model class, whose quantized linears get the
dequantized weights unpacked from the checkpoint's tensors in plain torch (`lm_lite.packing`), or, for W8A8, a
plain-torch emulation of per-token dynamic int8 activations times the int8 weights.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_lite")
pytest.importorskip("lm_torch")

HERE = Path(__file__).parent
ROOT = HERE.parent.parent


def _load_by_path(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny_models = _load_by_path("tiny_models", ROOT / "tests" / "lm_lite" / "tiny_models.py")

CALIB_TEXT = (ROOT / "packages" / "lm-lite" / "src" / "lm_lite" / "data" / "calib_builtin.txt").read_text()[:20000]
CALIB = {"calib_samples": 2, "calib_seqlen": 64}
# Same dequantized weights in float32 on both sides: only the order of float operations differs.
WEIGHT_ONLY_TOLERANCE = 2e-4
# W8A8: both sides round activations to int8 per token, so the logits agree to float precision (below 1e-5) until an
# activation lies within float error of a rounding boundary and lands one level apart on the two sides; that token
# and the later ones (through attention) then move by up to a few 1e-3 (measured: internlm2 from position 16 of 40,
# 3.7e-3 at most, where quantization itself moved that tiny model's logits by 0.017). The test asks for float
# precision at a quarter of the positions at least (a wrong scale, layout or smoothing shifts every position) and,
# everywhere, for a difference under half the quantization's own effect on the logits.
W8A8_EXACT = 1e-5
W8A8_SHARE_OF_EFFECT = 0.5


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIB_TEXT)
    return str(path)


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(file))
    return state


class _W8A8Reference(torch.nn.Module):
    """Per-token dynamic int8 activations times per-channel int8 weights, in float64 plain torch."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight, self.scale, self.bias = weight.double(), scale.double(), bias

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1]).double()
        x_scale = flat.abs().amax(dim=-1, keepdim=True).clamp(min=1e-7) / 127
        x_q = torch.round(flat / x_scale).clamp(-128, 127)
        out = (x_q @ self.weight.t()) * x_scale * self.scale.t()
        if self.bias is not None:
            out = out + self.bias.double()
        return out.to(x.dtype).reshape(*x.shape[:-1], -1)


def fake_quant_reference(checkpoint: Path, source: Path):
    """transformers' model for `source`, holding the checkpoint's tensors with quantized linears dequantized."""
    from lm_lite.model_io import INTERNLM2_RENAMES, load_model, split_internlm2_wqkv
    from lm_lite.packing import unpack_awq, unpack_gptq

    config = json.loads((checkpoint / "config.json").read_text())
    quant = config["quantization_config"]
    state = _tensors(checkpoint)
    dense: dict[str, torch.Tensor] = {}
    w8a8: dict[str, tuple] = {}
    for name, tensor in state.items():
        module, _, param = name.rpartition(".")
        if param == "qweight" and quant["quant_method"] == "awq":
            dense[f"{module}.weight"] = unpack_awq(
                tensor, state[f"{module}.qzeros"], state[f"{module}.scales"], quant["group_size"]
            )
        elif param == "qweight":
            dense[f"{module}.weight"] = unpack_gptq(
                tensor, state[f"{module}.qzeros"], state[f"{module}.scales"], state[f"{module}.g_idx"], quant["bits"]
            )
        elif param in ("qzeros", "scales", "g_idx", "scale"):
            continue
        elif quant["quant_method"] == "smooth_quant" and param == "weight" and f"{module}.scale" in state:
            w8a8[module] = (tensor, state[f"{module}.scale"], state.get(f"{module}.bias"))
        else:
            dense[name] = tensor.float()
    if config["architectures"][0] == "InternLM2ForCausalLM":
        dense = _internlm2_to_llama(dense, config, INTERNLM2_RENAMES, split_internlm2_wqkv)
        w8a8 = _internlm2_w8a8_to_llama(w8a8, config, INTERNLM2_RENAMES, split_internlm2_wqkv)
    source_config = json.loads((source / "config.json").read_text())
    model, _ = load_model(source, source_config, torch.float32)
    missing, unexpected = model.load_state_dict(dense, strict=False)
    assert not unexpected, unexpected
    for module, (weight, scale, bias) in w8a8.items():
        parent, _, child = module.rpartition(".")
        setattr(model.get_submodule(parent), child, _W8A8Reference(weight, scale, bias))
    quantized = {n.rpartition(".")[0] for n in missing}
    assert quantized <= {"lm_head"} | set(w8a8), missing
    return model.eval()


def _internlm2_to_llama(dense, config, renames, split):
    from transformers import LlamaConfig

    llama = LlamaConfig(
        hidden_size=config["hidden_size"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"],
    )
    out = {}
    for name, tensor in dense.items():
        if ".attention.wqkv." in name:
            out.update(split(name, tensor, llama))
            continue
        for old, new in renames.items():
            if old in name:
                name = name.replace(old, new, 1)
                break
        out[name] = tensor
    return out


def _internlm2_w8a8_to_llama(w8a8, config, renames, split):
    """Split wqkv's int8 rows, scales and bias into q/k/v (rows are output channels); rename the rest."""
    out = {}
    for module, parts in w8a8.items():
        if module.endswith(".attention.wqkv"):
            pieces = [
                None if part is None else _internlm2_to_llama({f"{module}.weight": part}, config, renames, split)
                for part in parts
            ]
            for proj in ("q_proj", "k_proj", "v_proj"):
                name = module.replace(".attention.wqkv", f".self_attn.{proj}")
                out[name] = tuple(None if p is None else p[f"{name}.weight"] for p in pieces)
            continue
        renamed = next(iter(_internlm2_to_llama({f"{module}.weight": parts[0]}, config, renames, split)))
        out[renamed.removesuffix(".weight")] = parts
    return out


def lm_torch_logits(checkpoint: Path, ids: torch.Tensor) -> torch.Tensor:
    from lm_torch.attention import StepMetadata, TorchAttentionBackend
    from lm_torch.config import TorchEngineConfig
    from lm_torch.loader import build_model, load_hf_config

    hf_config = load_hf_config(checkpoint)
    if not getattr(hf_config, "architectures", None):
        hf_config.architectures = json.loads((checkpoint / "config.json").read_text())["architectures"]
    model = build_model(
        checkpoint, TorchEngineConfig(), hf_config, torch.device("cpu"), torch.float32, TorchAttentionBackend()
    )
    blocks = (len(ids) + 15) // 16
    caches = [(torch.zeros(blocks, 16, h, d), torch.zeros(blocks, 16, h, d)) for h, d in model.kv_cache_shape()]
    meta = model.prepare_attention(StepMetadata.build([len(ids)], [len(ids)], [list(range(blocks))], 16, "cpu"))
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(len(ids)), caches, meta))


# AWQ on every family; GPTQ and SmoothQuant on the families whose loading differs (packed Phi-3, InternLM2's wqkv,
# Gemma's offset norms and sandwich layers, Qwen3's explicit head_dim, the multimodal Gemma 3 checkpoint).
CASES = [(family, "awq") for family in tiny_models.FAMILIES] + [
    (family, method)
    for method in ("gptq", "smooth_quant")
    for family in ("llama", "qwen3", "gemma2", "gemma3_multimodal", "phi3", "internlm2")
]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "method"), CASES)
def test_lm_lite_checkpoint_runs_in_lm_torch_like_its_fake_quantized_reference(
    family, method, tmp_path, default_model_dir, calib_file
):
    import lm_lite

    source = tiny_models.make_tiny(family, tmp_path / "source", default_model_dir)
    out = tmp_path / "out"
    if method == "awq":
        lm_lite.auto_awq(source, out, w_group_size=32, calib_dataset=calib_file, **CALIB)
    elif method == "gptq":
        lm_lite.auto_gptq(source, out, w_group_size=32, desc_act=True, calib_dataset=calib_file, **CALIB)
    else:
        lm_lite.smooth_quant(source, out, calib_dataset=calib_file, **CALIB)
    ids = torch.randint(3, 40000, (40,), generator=torch.Generator().manual_seed(0))
    reference = fake_quant_reference(out, source)
    with torch.no_grad():
        expected = reference(input_ids=ids[None]).logits[0].float()
    ours = lm_torch_logits(out, ids)
    from lm_lite.model_io import load_model

    float_model, _ = load_model(source, json.loads((source / "config.json").read_text()), torch.float32)
    with torch.no_grad():
        float_logits = float_model(input_ids=ids[None]).logits[0].float()
    effect = (expected - float_logits).abs().max().item()  # what quantization did to the logits
    per_position = (ours - expected).abs().amax(-1)  # [positions]
    if method == "smooth_quant":
        assert (per_position < W8A8_EXACT).float().mean().item() >= 0.25, per_position.tolist()
        assert per_position.max().item() < W8A8_SHARE_OF_EFFECT * effect, (per_position.max().item(), effect)
    else:
        assert per_position.max().item() < WEIGHT_ONLY_TOLERANCE
        # The comparison means something: quantization moved the logits well away from the float model's.
        assert effect > 10 * WEIGHT_ONLY_TOLERANCE


# -- the perplexity table's bounds ------------------------------------------------------------------------------------

# A cheaper version of benchmarks/perplexity.py's table (docs/quantization.md): AWQ and SmoothQuant calibrate on 8
# samples of 256 tokens of lm-lite's built-in set, GPTQ on the table's 16 x 512 (its cost is the column loop, nearly
# independent of the token count, and with 8 x 256 tokens it overfits: 40.5 against RTN's 39.1 on three windows), and
# every variant is scored on the whole held-out text in windows of 512 (scoring is cheap next to quantizing; on the
# first three windows alone GPTQ's margin over RTN shrank to 2.8%). Group size 64: SmolLM2's hidden size 576 is no
# multiple of 128. GPTQ: act-order, asymmetric grid, damping 0.01, as in the table.
SMALL_RUN = {"calib_samples": 8, "calib_seqlen": 256}
GPTQ_RUN = {"calib_samples": 16, "calib_seqlen": 512, "sym": False}
WINDOWS, WINDOW_LEN = None, 512
# Bounds, below what was measured (docs/quantization.md): AWQ and GPTQ at least 3% below RTN (measured with the
# table's calibration: 8.5% and 5.1%), W8A8 and KV int8 within 2% of fp32 (issue #7; measured 1.5% and 0.0%), KV
# int4 within 25% (measured 14.2%: one scale per 64-feature head is coarse at 4 bits).
BEATS_RTN = 0.97
WITHIN_FP32 = 1.02
KV_INT4_BOUND = 1.25


@pytest.mark.slow
def test_perplexity_bounds_on_the_default_model(default_model_dir, tmp_path):
    import lm_lite

    perplexity = _load_by_path("perplexity_benchmark", ROOT / "benchmarks" / "perplexity.py")
    ids = perplexity.heldout_ids(default_model_dir, perplexity.DEFAULT_TEXT)
    checkpoints = {
        "fp32": default_model_dir,
        "rtn": lm_lite.rtn(default_model_dir, tmp_path / "rtn", w_group_size=64),
        "awq": lm_lite.auto_awq(default_model_dir, tmp_path / "awq", w_group_size=64, **SMALL_RUN),
        "gptq": lm_lite.auto_gptq(default_model_dir, tmp_path / "gptq", w_group_size=64, **GPTQ_RUN),
        "w8a8": lm_lite.smooth_quant(default_model_dir, tmp_path / "w8a8", **SMALL_RUN),
    }
    ppl = {name: perplexity.perplexity(path, ids, WINDOW_LEN, WINDOWS) for name, path in checkpoints.items()}
    for name, policy in (("kv_int8", 8), ("kv_int4", 4)):
        ppl[name] = perplexity.perplexity(default_model_dir, ids, WINDOW_LEN, WINDOWS, quant_policy=policy)
    print({name: round(value, 3) for name, value in ppl.items()})
    assert ppl["rtn"] > 1.05 * ppl["fp32"]  # 4-bit round-to-nearest visibly hurts: the bounds below mean something
    assert ppl["awq"] < BEATS_RTN * ppl["rtn"]
    assert ppl["gptq"] < BEATS_RTN * ppl["rtn"]
    assert ppl["w8a8"] < WITHIN_FP32 * ppl["fp32"]
    assert ppl["kv_int8"] < WITHIN_FP32 * ppl["fp32"]
    assert ppl["kv_int4"] < KV_INT4_BOUND * ppl["fp32"]
