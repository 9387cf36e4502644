"""Qwen2-VL / Qwen2.5-VL preprocessing against transformers' PIL image processor and qwen-vl-utils' smart_resize."""

from __future__ import annotations

import ast
import importlib.util
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from lm_vl.processors import placeholder_spans, processor_class
from lm_vl.processors.qwen2_vl import Qwen2VLProcessor, smart_resize

# Qwen2.5-VL-7B-Instruct's published preprocessor_config.json (the values that shape the pixels).
QWEN25_7B: dict[str, Any] = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
}
# (height, width): tiny, extreme ratios, large, and random sizes and aspect ratios.
_rng = np.random.default_rng(2024)
SIZES = [(30, 40), (1000, 60), (60, 1000), (1500, 1100), (1200, 1500), (13, 9), (28, 28), (224, 224)] + [
    (int(h), int(w)) for h, w in _rng.integers(20, 900, size=(12, 2))
]


def _hf(**config: Any) -> Any:
    module = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    return module.Qwen2VLImageProcessorPil(**config)


def _noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _assert_parity(hf: Any, ours: Qwen2VLProcessor, array: np.ndarray) -> float:
    """Both processors on `array`; asserts equal grids and shapes, returns the max abs pixel difference."""
    expected = hf(images=[Image.fromarray(array)], return_tensors="np")
    item = ours.preprocess(Image.fromarray(array))
    grid = expected["image_grid_thw"][0].tolist()
    assert item.meta["grid_thw"] == grid
    assert tuple(item.pixel_values.shape) == expected["pixel_values"].shape
    assert item.pixel_values.dtype == torch.float32
    assert item.num_tokens == math.prod(grid) // QWEN25_7B["merge_size"] ** 2
    return float(np.abs(item.pixel_values.numpy() - expected["pixel_values"]).max())


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_image_parity_with_transformers(size: tuple[int, int]) -> None:
    diff = _assert_parity(_hf(**QWEN25_7B), Qwen2VLProcessor({}, QWEN25_7B), _noise(*size, seed=size[0] * size[1]))
    assert diff <= 1e-5, f"max abs diff {diff}"


@pytest.mark.parametrize("size", [(300, 400), (997, 131), (640, 1500)])
def test_image_parity_downscale_branch(size: tuple[int, int]) -> None:
    config = {**QWEN25_7B, "max_pixels": 28 * 28 * 16}
    height, width = size
    assert round(height / 28) * round(width / 28) * 28 * 28 > config["max_pixels"]  # smart_resize shrinks
    ours = Qwen2VLProcessor({}, config)
    assert _assert_parity(_hf(**config), ours, _noise(height, width)) <= 1e-5
    _, h, w = ours.preprocess(_noise(height, width)).meta["grid_thw"]
    assert h * w * 14 * 14 <= config["max_pixels"]


def test_size_form_and_defaults() -> None:
    size_form = {k: v for k, v in QWEN25_7B.items() if k not in ("min_pixels", "max_pixels")}
    size_form["size"] = {"shortest_edge": 3136, "longest_edge": 28 * 28 * 16}
    ours = Qwen2VLProcessor({}, size_form)
    assert ours.image_pixels == (3136, 28 * 28 * 16)
    assert _assert_parity(_hf(**size_form), ours, _noise(300, 500)) <= 1e-5
    # An empty config takes transformers' class defaults (CLIP mean/std, bicubic, 56*56 .. 28*28*1280).
    assert _assert_parity(_hf(), Qwen2VLProcessor({}, {}), _noise(1400, 1300)) <= 1e-5


def test_smart_resize_matches_transformers() -> None:
    module = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    # 19x19 and the squares near 3584**2 pixels are where float and exact arithmetic part ways.
    sides = [1, 5, 13, 14, 15, 19, 27, 28, 29, 42, 55, 99, 250, 511, 1023, 3740, 3925, 4258, 4517, 9000]
    for bounds in [(3136, 12845056), (3136, 28 * 28 * 16), (56 * 56, 28 * 28 * 1280)]:
        for height in sides:
            for width in sides:
                if max(height, width) / min(height, width) <= 200:
                    expected = module.smart_resize(height, width, 28, *bounds)
                    assert smart_resize(height, width, 28, *bounds) == expected, (height, width, bounds)


def _qwen_vl_utils_smart_resize() -> Any:
    """qwen-vl-utils' `smart_resize`, taken from its source: the package imports torchvision, which this environment
    must not have, so its module cannot be imported here."""
    spec = importlib.util.find_spec("qwen_vl_utils")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("qwen-vl-utils is not installed")
    source = (Path(next(iter(spec.submodule_search_locations))) / "vision_process.py").read_text()
    wanted = {"round_by_factor", "ceil_by_factor", "floor_by_factor", "smart_resize"}
    nodes = [
        node
        for node in ast.parse(source).body
        if (isinstance(node, ast.FunctionDef) and node.name in wanted)
        or (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant))
    ]
    namespace: dict[str, Any] = {"math": math, "Optional": Any, "Tuple": tuple}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), "qwen_vl_utils/vision_process.py", "exec"), namespace)
    return namespace["smart_resize"]


def test_smart_resize_matches_qwen_vl_utils() -> None:
    reference = _qwen_vl_utils_smart_resize()
    rng = np.random.default_rng(7)
    # qwen-vl-utils clamps a side that rounds to 0 up to one factor before choosing a branch, and does not clamp the
    # shrunk sides; transformers (which this module follows) does the opposite. The two agree once the short side is
    # at least 15 px (so it rounds to one factor or more), as in these sizes, and a shrunk side stays one factor.
    sizes = [(int(h), int(w)) for h, w in rng.integers(15, 6000, size=(3000, 2))] + [(15, 15), (100, 8989), (19, 19)]
    checked = clamped = 0
    for bounds in [(3136, 12845056), (56 * 56, 28 * 28 * 1280), (3136, 28 * 28 * 64)]:
        for height, width in sizes:
            if max(height, width) / min(height, width) <= 200:
                expected = reference(height, width, 28, *bounds)
                if 0 in expected:  # a side shrunk below one factor: qwen-vl-utils leaves 0, transformers 28
                    expected = tuple(max(28, side) for side in expected)
                    clamped += 1
                assert smart_resize(height, width, 28, *bounds) == expected, (height, width, bounds)
                checked += 1
    assert checked > 5000 and 0 < clamped < checked // 20
    # Where they differ, this module gives transformers' size: a 10 px side rounds to 0, so transformers enlarges the
    # image to min_pixels (short side 28, long side 560); qwen-vl-utils clamps the 0 to 28 and keeps the long side.
    assert smart_resize(10, 1000, 28, 3136, 12845056) == (28, 560)
    assert reference(10, 1000, 28, 3136, 12845056) == (28, 1008)


def test_num_tokens_match_transformers_expansion() -> None:
    hf = _hf(**QWEN25_7B)
    ours = Qwen2VLProcessor({}, QWEN25_7B)
    for height, width in [(30, 40), (480, 640), (1000, 60)]:
        item = ours.preprocess(_noise(height, width))
        patches = hf.get_number_of_image_patches(height, width)
        assert item.pixel_values.shape[0] == patches == math.prod(item.meta["grid_thw"])
        assert item.num_tokens == patches // 4
        assert ours.replacement(item) == "<|image_pad|>" * item.num_tokens


def test_expand_prompt_and_placeholder_spans_round_trip() -> None:
    ours = Qwen2VLProcessor({}, QWEN25_7B)
    items = [ours.preprocess(_noise(60, 90)), ours.preprocess(_noise(120, 40, seed=1))]
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    prompt = f"<|im_start|>user\n{image}ab{image}c<|im_end|>"
    vocab: dict[str, int] = {"<|video_pad|>": 0}
    text = ours.expand_prompt(prompt, items)
    pieces = re.findall(r"<\|[a-z_]+\|>|.", text, flags=re.S)
    ids = [vocab.setdefault(piece, len(vocab)) for piece in pieces]
    assert pieces.count("<|image_pad|>") == sum(item.num_tokens for item in items)
    spans = placeholder_spans(ids, items, ours.placeholder_ids(vocab))
    assert [n for _, n in spans] == [item.num_tokens for item in items]
    for offset, length in spans:
        assert pieces[offset - 1] == "<|vision_start|>" and pieces[offset + length] == "<|vision_end|>"
    with pytest.raises(ValueError):
        placeholder_spans(ids, items[:1], ours.placeholder_ids(vocab))


def _reference_video(frames: list[np.ndarray], config: dict[str, Any]) -> np.ndarray:
    """The Qwen2-VL video rows in numpy: each frame resized by Pillow, rescaled in float64 and normalised in float32
    (transformers' numpy ops), the last frame repeated to a multiple of T, and the order of transformers'
    `Qwen2VLVideoProcessor.patchify`: view (t, T, C, h/m, m, p, w/m, m, p), axes (0, 3, 6, 4, 7, 2, 1, 5, 8)."""
    p, tp, m = config["patch_size"], config["temporal_patch_size"], config["merge_size"]
    height, width = smart_resize(*frames[0].shape[:2], p * m, config["min_pixels"], config["max_pixels"])
    mean, std = np.array(config["image_mean"], np.float32), np.array(config["image_std"], np.float32)
    out = []
    for frame in frames:
        resized = np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC))
        out.append(((((resized.astype(np.float64) * (1 / 255)).astype(np.float32)) - mean) / std).transpose(2, 0, 1))
    video = np.stack(out + [out[-1]] * (-len(out) % tp))
    t, c = video.shape[0] // tp, video.shape[1]
    video = video.reshape(t, tp, c, height // p // m, m, p, width // p // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return video.reshape(t * (height // p) * (width // p), c * tp * p * p)


def test_video_order_counts_and_padding() -> None:
    ours = Qwen2VLProcessor({}, QWEN25_7B)
    frames = [_noise(90, 150, seed=i) for i in range(5)]
    item = ours.preprocess_video([Image.fromarray(f) for f in frames], fps=2.0)
    assert item.modality == "video"
    assert item.meta["grid_thw"] == [3, 6, 10]  # 5 frames padded to 6; 90x150 -> 84x140
    assert item.meta["second_per_grid_t"] == 1.0
    assert item.pixel_values.shape == (3 * 6 * 10, 3 * 2 * 14 * 14)
    assert item.num_tokens == 3 * 6 * 10 // 4
    assert float(np.abs(item.pixel_values.numpy() - _reference_video(frames, QWEN25_7B)).max()) <= 1e-5
    # Padding repeats the last frame: 5 frames give the same rows as those 5 plus a copy of the last.
    assert torch.equal(
        ours.preprocess_video(frames).pixel_values, ours.preprocess_video(frames + frames[-1:]).pixel_values
    )
    assert "second_per_grid_t" not in ours.preprocess_video(frames).meta
    assert ours.replacement(item) == "<|video_pad|>" * item.num_tokens


def test_video_of_identical_frames_equals_image() -> None:
    ours = Qwen2VLProcessor({}, QWEN25_7B)
    frame = _noise(200, 130, seed=3)
    image = ours.preprocess(frame)
    assert torch.equal(ours.preprocess_video([frame, frame]).pixel_values, image.pixel_values)
    four = ours.preprocess_video([frame] * 4)
    assert four.meta["grid_thw"] == [2, *image.meta["grid_thw"][1:]]
    assert torch.equal(four.pixel_values, torch.cat([image.pixel_values, image.pixel_values]))
    assert four.content_hash != image.content_hash


def test_content_hash_device_and_registry() -> None:
    ours = Qwen2VLProcessor({}, QWEN25_7B)
    array = _noise(64, 80)
    item = ours.preprocess(array, device="cpu")
    assert item.content_hash == ours.preprocess(torch.from_numpy(array).permute(2, 0, 1).contiguous()).content_hash
    changed = array.copy()
    changed[0, 0, 0] ^= 1
    assert ours.preprocess(changed).content_hash != item.content_hash
    smaller = Qwen2VLProcessor({}, {**QWEN25_7B, "min_pixels": 28 * 28, "max_pixels": 28 * 28 * 4})
    assert smaller.preprocess(array).content_hash != item.content_hash
    assert processor_class("qwen2_vl") is Qwen2VLProcessor and processor_class("qwen2_5_vl") is Qwen2VLProcessor


def test_errors() -> None:
    ours = Qwen2VLProcessor({}, QWEN25_7B)
    with pytest.raises(ValueError, match="uint8"):
        ours.preprocess(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="aspect ratio"):
        ours.preprocess(np.zeros((4, 1000, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="frame 1"):
        ours.preprocess_video([_noise(40, 40), _noise(40, 50)])
    with pytest.raises(ValueError, match="no frames"):
        ours.preprocess_video([])
    with pytest.raises(ValueError, match="min_pixels"):
        Qwen2VLProcessor({}, {"min_pixels": 10_000, "max_pixels": 100})
