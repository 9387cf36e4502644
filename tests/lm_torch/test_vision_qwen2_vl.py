"""Qwen2-VL / Qwen2.5-VL vision towers (`lm_torch.models.vision.qwen2_vl`) against transformers' `model.visual`.

Tiny random models are built with transformers under a fixed seed (norm and bias parameters perturbed so they are not
ones/zeros), saved with `save_pretrained`, and our tower loads the saved `visual.*` tensors. One batched call over an
image whose Qwen2.5 windows need padding (merged grid 3x5, windows of 2x2 merged units), one with several exact
windows (4x4) and a 2-frame video must match transformers' merged embeddings (`pooler_output`).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lm_torch.models.vision.qwen2_vl import Qwen2VisionTower, segment_attention, segment_groups, window_order

transformers = pytest.importorskip("transformers")

GRIDS = torch.tensor([[1, 6, 10], [1, 8, 8], [2, 4, 4]])
TEXT = dict(
    hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    vocab_size=128, bos_token_id=None, eos_token_id=None,
)  # fmt: skip
VISION = {
    "qwen2_vl": dict(
        depth=3, embed_dim=32, mlp_ratio=2, num_heads=2, hidden_size=64, hidden_act="quick_gelu", patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
    ),
    "qwen2_5_vl": dict(
        depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, hidden_act="silu",
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1, 3],
        in_channels=3,
    ),
}  # fmt: skip
PATCH_DIM = 3 * 2 * 14 * 14


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def models(request, tmp_path_factory):
    """(transformers' visual module, our tower, its vision config, the checkpoint tensors it loaded)."""
    if request.param == "qwen2_vl":
        config = transformers.Qwen2VLConfig(text_config=TEXT, vision_config=VISION["qwen2_vl"])
        cls = transformers.Qwen2VLForConditionalGeneration
    else:
        config = transformers.Qwen2_5_VLConfig(text_config=TEXT, vision_config=VISION["qwen2_5_vl"])
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for param in model.model.visual.parameters():
            if param.ndim == 1:  # norms and biases: move off their ones / zeros initialization
                param.add_(0.1 * torch.randn_like(param))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    saved = load_file(path / "model.safetensors")
    assert not any(name.startswith("model.visual.") for name in saved)
    weights = {name.removeprefix("visual."): t for name, t in saved.items() if name.startswith("visual.")}
    tower = Qwen2VisionTower(config.vision_config).eval()
    loaded = tower.load_weights(weights.items())
    assert loaded == set(weights) == {name for name, _ in tower.named_parameters()}
    return model.model.visual, tower, config.vision_config, weights


def _pixels(grids: torch.Tensor, seed: int = 1) -> torch.Tensor:
    return torch.randn(int(grids.prod(-1).sum()), PATCH_DIM, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_batched_matches_transformers(models) -> None:
    reference, tower, _, _ = models
    pixels = _pixels(GRIDS)
    expected = reference(pixels, grid_thw=GRIDS).pooler_output
    ours = tower(pixels, GRIDS)
    assert ours.shape == (int(GRIDS.prod(-1).sum()) // 4, 64)
    assert (ours - expected).abs().max().item() < 1e-5


@torch.no_grad()
def test_single_item_equals_its_batched_rows(models) -> None:
    _, tower, _, _ = models
    pixels = _pixels(GRIDS)
    batched = Qwen2VisionTower.split_per_item(tower(pixels, GRIDS), GRIDS, 2)
    assert [len(part) for part in batched] == [15, 16, 8]
    starts = [0, *GRIDS.prod(-1).cumsum(0).tolist()]
    for i in range(len(GRIDS)):
        alone = tower(pixels[starts[i] : starts[i + 1]], GRIDS[i : i + 1])
        assert (alone - batched[i]).abs().max().item() < 1e-5


@torch.no_grad()
def test_bf16_close_to_fp32(models) -> None:
    _, tower, config, weights = models
    pixels = _pixels(GRIDS)
    fp32 = tower(pixels, GRIDS)
    half = Qwen2VisionTower(config, dtype=torch.bfloat16)
    half.load_weights(weights.items())
    out = half(pixels, GRIDS)
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits; observed ~0.5% of the output scale, allowed 2%.
    assert (out.float() - fp32).abs().max().item() < 0.02 * fp32.abs().max().item()


def test_load_weights_rejects_bad_tensors(models) -> None:
    _, tower, _, _ = models
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.weight"):
        tower.load_weights([("blocks.0.attn.qkv.weight", torch.zeros(3, 3))])
    with pytest.raises(ValueError, match=r"patch_embed\.proj\.weight"):  # the flattened kernel is not the checkpoint's
        tower.load_weights([("patch_embed.proj.weight", torch.zeros(32, PATCH_DIM))])
    with pytest.raises(ValueError, match=r"blocks\.9\.attn\.qkv\.weight"):
        tower.load_weights([("blocks.9.attn.qkv.weight", torch.zeros(96, 32))])


def test_window_order_pads_partial_windows() -> None:
    # One 2x3 merged grid, windows of 2x2: a full window (blocks 0, 1, 3, 4) then a padded one (blocks 2, 5).
    order, cu = window_order(torch.tensor([[1, 4, 6]]), merge=2, window=2)
    assert order.tolist() == [0, 1, 3, 4, 2, 5]
    assert cu.tolist() == [0, 16, 24]
    groups = segment_groups(torch.tensor([0, 2, 3, 5, 8]), torch.device("cpu"))
    assert [g.tolist() for g in groups] == [[[2]], [[0, 1], [3, 4]], [[5, 6, 7]]]


def test_segment_attention_equals_a_masked_attention() -> None:
    """Per-segment attention against plain SDPA under the block-diagonal mask of the same segments."""
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 9, 14, 20, 21])
    q, k, v = (torch.randn(21, 3, 8) for _ in range(3))
    segment = torch.searchsorted(cu[1:], torch.arange(21), right=True)
    mask = segment[:, None] == segment[None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask
    ).transpose(0, 1)
    got = segment_attention(q, k, v, segment_groups(cu, torch.device("cpu")))
    assert (got - expected).abs().max().item() < 1e-6
