"""InternVL3 preprocessing against transformers: tiles equal to the PIL GotOcr2 image processor's, the tile grid equal
to `get_optimal_tiled_canvas` (ties included), and prompts expanded as transformers' InternVLProcessor expands them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
    GotOcr2ImageProcessorPil,
    get_optimal_tiled_canvas,
)

from lm_vl.processors.base import VisionProcessor, load_processor, placeholder_spans, processor_class
from lm_vl.processors.internvl import InternVLProcessor, tile_grid

# OpenGVLab/InternVL3-8B-hf preprocessor_config.json and the config.json fields the processor reads.
PRE = {
    "crop_to_patches": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "max_patches": 12,
    "min_patches": 1,
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 448, "width": 448},
}
CONFIG = {
    "model_type": "internvl",
    "downsample_ratio": 0.5,
    "vision_config": {"image_size": [448, 448], "patch_size": [14, 14]},
}
TOKENS_PER_TILE = 256

# (height, width): tiny, extreme ratios, squares around the (1, 1) / (2, 2) / (3, 3) tie thresholds, random.
_rng = np.random.default_rng(7)
SIZES = [(20, 30), (100, 2000), (2000, 100), (448, 448), (640, 640), (1000, 1000), (634, 1268), (300, 1200)]
SIZES += [(int(h), int(w)) for h, w in _rng.integers(16, 1800, size=(12, 2))]


def noise(height: int, width: int, seed: int = 0) -> Image.Image:
    """A random-noise RGB image."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def reference(image: Image.Image, **overrides: object) -> np.ndarray:
    """transformers' PIL processor output for `image` (preprocessor values `PRE` with `overrides`): (n, 3, H, W)."""
    processor = GotOcr2ImageProcessorPil(**{**PRE, **overrides})
    out = processor(images=[image])
    assert out["num_patches"] == [len(out["pixel_values"])]
    return np.stack(out["pixel_values"])


def check_parity(sizes: list[tuple[int, int]], ours: dict | None = None, **overrides: object) -> float:
    """Our tiles (processor built with `ours` over the published values) equal transformers' image processor's with
    `overrides`, for each size; returns the largest absolute difference."""
    ours_processor = InternVLProcessor(CONFIG, {**PRE, **(ours if ours is not None else overrides)})
    worst = 0.0
    for seed, (height, width) in enumerate(sizes):
        image = noise(height, width, seed)
        expected = reference(image, **overrides)
        item = ours_processor.preprocess(image)
        assert item.pixel_values.dtype == torch.float32
        assert tuple(item.pixel_values.shape) == expected.shape, (height, width)
        assert item.meta == {"num_tiles": expected.shape[0]}
        assert item.num_tokens == TOKENS_PER_TILE * expected.shape[0]
        diff = float(np.abs(item.pixel_values.numpy() - expected).max())
        assert diff < 1e-5, (height, width, diff)
        worst = max(worst, diff)
    return worst


def test_tiles_match_transformers() -> None:
    worst = check_parity(SIZES)
    print(f"max abs diff, max_patches 12: {worst:.3g}")


def test_tiles_match_transformers_max_patches_6() -> None:
    worst = check_parity([(20, 30), (100, 2000), (1000, 1000), (900, 1600), (1300, 500)], max_patches=6)
    print(f"max abs diff, max_patches 6: {worst:.3g}")


def test_a_config_without_crop_to_patches_still_tiles_as_the_full_processor_does() -> None:
    """transformers' InternVLProcessor passes crop_to_patches=True whatever preprocessor_config.json says."""
    worst = check_parity([(20, 30), (100, 2000), (1000, 700)], ours={"crop_to_patches": False}, crop_to_patches=True)
    print(f"max abs diff, a config with crop_to_patches False: {worst:.3g}")
    assert InternVLProcessor(CONFIG, {**PRE, "max_patches": 1}).grid(1000, 3000) == (1, 1)


def test_grid_matches_transformers_ties_included() -> None:
    rng = np.random.default_rng(1)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 4000, size=(1500, 2))]
    # Square and 2:1 images on both sides of the area thresholds where a larger grid of equal ratio wins.
    sizes += [(s, s) for s in range(600, 1000, 7)] + [(s, 2 * s) for s in range(620, 650)] + [(3, 1), (1, 3)]
    for min_tiles, max_tiles in [(1, 12), (1, 6), (2, 9), (4, 4), (1, 1)]:
        for height, width in sizes:
            expected = get_optimal_tiled_canvas((height, width), (448, 448), min_tiles, max_tiles)
            assert tile_grid(height, width, (448, 448), min_tiles, max_tiles) == expected, (height, width)
    assert tile_grid(800, 800, (448, 448), 1, 12) == (2, 2)
    assert tile_grid(448, 448, (448, 448), 1, 12) == (1, 1)


def test_inputs_and_device() -> None:
    processor = InternVLProcessor(CONFIG, PRE)
    image = noise(500, 900, seed=3)
    item = processor.preprocess(image)
    array = np.asarray(image)
    for other in (array, torch.from_numpy(array).permute(2, 0, 1).contiguous()):
        same = processor.preprocess(other, device="cpu")
        assert torch.equal(same.pixel_values, item.pixel_values)
        assert same.content_hash == item.content_hash
    assert processor.preprocess(noise(500, 900, seed=4)).content_hash != item.content_hash
    other_std = InternVLProcessor(CONFIG, {**PRE, "image_std": [0.5, 0.5, 0.5]}).preprocess(image)
    assert other_std.content_hash != item.content_hash


def test_non_uint8_is_rejected() -> None:
    processor = InternVLProcessor(CONFIG, PRE)
    with pytest.raises(ValueError):
        processor.preprocess(torch.rand(3, 64, 64))
    with pytest.raises(ValueError):
        processor.preprocess(np.zeros((64, 64, 3), dtype=np.float32))
    with pytest.raises(ValueError):
        processor.preprocess(torch.zeros(3, 64, 64, dtype=torch.int16))


def test_tokens_per_tile_from_config(tmp_path: Path) -> None:
    assert InternVLProcessor(CONFIG, PRE).tokens_per_tile == 256
    scalar = {**CONFIG, "vision_config": {"image_size": 448, "patch_size": 14}}
    assert InternVLProcessor(scalar, PRE).tokens_per_tile == 256
    assert InternVLProcessor({**CONFIG, "downsample_ratio": 1.0}, PRE).tokens_per_tile == 1024
    with pytest.raises(ValueError):
        InternVLProcessor(CONFIG, {**PRE, "size": {"height": 384, "width": 384}})
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(PRE))
    assert processor_class("internvl") is InternVLProcessor
    assert isinstance(load_processor(tmp_path), InternVLProcessor)


def _tiny_tokenizer() -> object:
    """A word-level tokenizer with InternVL's image tokens as its special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<img>": 1, "</img>": 2, "<IMG_CONTEXT>": 3, "<video>": 4, "Look": 5, "then": 6, "ok": 7}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", extra_special_tokens={**special, "video_token": "<video>"}
    )


def test_prompt_expansion_matches_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.models.internvl.processing_internvl import InternVLProcessor as HFProcessor

    # Without torchvision transformers cannot resolve the video processor class; the images need none.
    check = HFProcessor.check_argument_for_proper_class
    monkeypatch.setattr(
        HFProcessor,
        "check_argument_for_proper_class",
        lambda self, name, arg: None if name == "video_processor" else check(self, name, arg),
    )
    tokenizer = _tiny_tokenizer()
    hf = HFProcessor(image_processor=GotOcr2ImageProcessorPil(**PRE), tokenizer=tokenizer, video_processor=None)
    assert (hf.image_token, hf.start_image_token, hf.end_image_token) == ("<IMG_CONTEXT>", "<img>", "</img>")
    assert hf.image_seq_length == TOKENS_PER_TILE

    ours = InternVLProcessor(CONFIG, PRE)
    images = [noise(100, 900, seed=1), noise(50, 50, seed=2)]
    items = [ours.preprocess(image) for image in images]
    assert [item.meta["num_tiles"] for item in items] == [10, 1]
    text = "Look <IMG_CONTEXT>\n then <IMG_CONTEXT>\n ok"
    expected_ids = hf(images=images, text=text)["input_ids"][0]
    expanded = ours.expand_prompt(text, items)
    assert tokenizer(expanded)["input_ids"] == expected_ids
    assert expanded.count("<IMG_CONTEXT>") == TOKENS_PER_TILE * 11

    ids = ours.placeholder_ids(tokenizer.convert_tokens_to_ids)
    spans = placeholder_spans(expected_ids, items, ids)
    assert [n for _, n in spans] == [TOKENS_PER_TILE * 10, TOKENS_PER_TILE]
    for offset, n in spans:
        assert expected_ids[offset - 1] == 1 and expected_ids[offset + n] == 2


def test_replacement_string() -> None:
    processor = InternVLProcessor(CONFIG, PRE)
    item = processor.preprocess(noise(800, 800))
    assert item.meta["num_tiles"] == 5
    assert processor.replacement(item) == "<img>" + "<IMG_CONTEXT>" * (256 * 5) + "</img>"
    with pytest.raises(ValueError):
        processor.expand_prompt("<IMG_CONTEXT> <IMG_CONTEXT>", [item])
    assert isinstance(processor, VisionProcessor)
