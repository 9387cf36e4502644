"""Round-to-nearest, GPTQ and the scale moves of AWQ/SmoothQuant, on plain tensors and tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from lm_lite.families import FAMILIES, family_for
from lm_lite.gptq import GPTQSettings, gptq
from lm_lite.quant_math import quantize_groups


def test_round_to_nearest_error_is_at_most_half_a_step():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    q = quantize_groups(w, 4, 32)
    assert q.qweight.min() >= 0 and q.qweight.max() <= 15
    step = q.scales.repeat_interleave(32, dim=1)
    assert ((w - q.dequantize()).abs() <= step / 2 + 1e-6).all()


def test_fused_fake_quantize_is_round_to_nearest():
    from lm_lite.quant_math import fake_quantize

    w = 3 * torch.randn(96, 128, generator=torch.Generator().manual_seed(5))
    for group_size in (32, -1):
        assert torch.equal(fake_quantize(w, 4, group_size), quantize_groups(w, 4, group_size).dequantize())


def _correlated_inputs(num: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(8, dim, generator=g)
    # A few directions carry most of the energy and some channels are large: as in real activations.
    x = torch.randn(num, 8, generator=g) @ basis + 0.1 * torch.randn(num, dim, generator=g)
    return x * (1 + 4 * (torch.arange(dim) % 7 == 0))


@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_output_error_is_below_round_to_nearest(desc_act):
    x = _correlated_inputs(512, 64, seed=1)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    hessian = 2 * x.t() @ x / x.shape[0]
    settings = GPTQSettings(bits=4, group_size=16, sym=True, desc_act=desc_act)
    q = gptq(w, hessian, settings)
    rtn = quantize_groups(w, 4, 16, sym=True, include_zero=True)
    gptq_err = (x @ (w - q.dequantize()).t()).pow(2).mean()
    rtn_err = (x @ (w - rtn.dequantize()).t()).pow(2).mean()
    assert gptq_err < 0.7 * rtn_err
    if desc_act:
        # Each group holds exactly group_size columns, in the order of decreasing Hessian diagonal.
        assert torch.bincount(q.g_idx.long()).tolist() == [16] * 4
        order = torch.argsort(torch.diag(hessian), descending=True)
        assert torch.equal(q.g_idx[order].long(), torch.arange(64) // 16)
    else:
        assert q.g_idx is None


def test_gptq_sets_always_zero_inputs_to_zero():
    x = _correlated_inputs(256, 32, seed=3)
    x[:, 5] = 0
    q = gptq(torch.randn(8, 32), 2 * x.t() @ x / 256, GPTQSettings(bits=4, group_size=32, sym=False))
    assert (q.dequantize()[:, 5].abs() <= q.scales[:, 0] / 2 + 1e-6).all()
    assert (q.zeros >= 1).all()  # storable in the GPTQ v1 layout


def test_every_supported_architecture_has_a_family():
    for family in FAMILIES:
        for arch in family.architectures:
            assert family_for(arch) is family
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*not supported.*LlamaForCausalLM"):
        family_for("GPT2LMHeadModel")


FAMILY_NAMES = ["llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_multimodal", "phi3", "internlm2"]


@pytest.mark.parametrize("family_name", FAMILY_NAMES)
def test_moving_scales_leaves_the_float_model_unchanged(family_name, make_tiny):
    """SmoothQuant's and AWQ's scale moves (norm -> linears, v -> o across GQA, up -> down, packed Phi-3 rows,
    Gemma's 1 + w norms) change how the work is split, never what the layer computes."""
    from lm_lite.model_io import decoder_layers, load_model
    from lm_lite.scaling import GroupGeometry, apply_scale
    from lm_lite.smooth import smooth_layer

    source = make_tiny(family_name)
    config = json.loads((source / "config.json").read_text())
    model, _ = load_model(source, config, torch.float32)
    family = family_for(config["architectures"][0])
    ids = torch.randint(3, 40000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        _, layers = decoder_layers(model)
        norm_before = layers[0].input_layernorm.weight.clone()
        text_config = getattr(model.config, "text_config", None) or model.config
        g = torch.Generator().manual_seed(1)
        for layer in layers:
            absmax = {n: 0.1 + 5 * torch.rand(layer.get_submodule(n).in_features, generator=g) for n in family.linears}
            smooth_layer(layer, family, text_config, absmax, alpha=0.5)
            for group in family.groups:  # and an arbitrary AWQ-style scale on top
                geometry = GroupGeometry(group, text_config)
                size = geometry.kv_size if geometry.grouped else layer.get_submodule(group.linears[0]).in_features
                apply_scale(layer, geometry, 0.5 + torch.rand(size, generator=g), family.norm_offset)
        after = model(input_ids=ids).logits
    assert (after - before).abs().max().item() < 1e-4
    # The scales did move: the first norm's weights are no longer what they were.
    assert (layers[0].input_layernorm.weight - norm_before).abs().max().item() > 0.1
