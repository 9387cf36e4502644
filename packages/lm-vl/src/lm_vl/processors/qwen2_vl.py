"""Qwen2-VL and Qwen2.5-VL image and video preprocessing in torch, equal to transformers' PIL image processor.

Qwen's vision tower takes an image at a size chosen per image (`smart_resize`: both sides multiples of
`patch_size * merge_size`, the area within [min_pixels, max_pixels], the aspect ratio kept), cut into
`patch_size`-square patches that are grouped `temporal_patch_size` frames deep. The rows come in merge order: for
each `merge_size x merge_size` block of patches (blocks row-major), its patches row-major, so that the tower's patch
merger finds each block's patches in consecutive rows. Each row is one patch flattened as `(C, T, p, p)`.

This module computes the same rows as `Qwen2VLImageProcessorPil` (transformers): Pillow's resize (reproduced to the
bit by `resize.pil_resize`), rescale in float64 then float32 normalisation, then the patch order, all as tensor ops
on any device. An image is one frame repeated `temporal_patch_size` times, giving `grid_t = 1`. A video's frames
are stacked, the last frame repeated up to a multiple of `temporal_patch_size`, and patchified in the order of
transformers' `Qwen2VLVideoProcessor.patchify` (the temporal pair of frames inside each row, rows ordered by frame
group, then as for an image); its frames are resized with Pillow as the image path does (the torchvision video
processor resizes with torchvision instead, which is not bit-equal to Pillow).

`smart_resize` repeats transformers' Python float expressions in their order. Exact integer arithmetic would differ
from them where a rounding lands on a perfect square (transformers sizes a 19x19 image to 84x84 and a 3740x3740 one
to 3556x3556 where exact arithmetic gives 56 and 3584), and the model's token counts must follow transformers.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lm_vl.processors.base import VisionItem, VisionProcessor, content_hash, register
from lm_vl.processors.resize import pil_resize, resample_name, rescale_normalize, to_tensor

# transformers' class defaults: `Qwen2VLImageProcessorPil.size` and `Qwen2VLVideoProcessor.size` (pixels).
IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 28 * 28 * 1280
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 28 * 28 * 768
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The largest long-side / short-side ratio `smart_resize` accepts.
MAX_RATIO = 200


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = IMAGE_MIN_PIXELS, max_pixels: int = IMAGE_MAX_PIXELS
) -> tuple[int, int]:
    """(height, width) resized as transformers' Qwen2-VL `smart_resize` sizes it, for the same float results."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size {height}x{width}: both sides must be positive")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_RATIO:
        raise ValueError(
            f"image size {height}x{width}: aspect ratio {ratio:.1f} is above {MAX_RATIO}, which Qwen2-VL's "
            "smart_resize refuses"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(
    frames: torch.Tensor, patch_size: int, temporal_patch_size: int, merge_size: int
) -> tuple[torch.Tensor, list[int]]:
    """Frames `(F, C, H, W)` as Qwen's patch rows `(t * h * w, C * T * p * p)` and the grid `[t, h, w]`."""
    if pad := -frames.shape[0] % temporal_patch_size:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    num_frames, channels, height, width = frames.shape
    p, m, tp = patch_size, merge_size, temporal_patch_size
    grid = [num_frames // tp, height // p, width // p]
    if height % (p * m) or width % (p * m):
        raise ValueError(f"frames {height}x{width}: both sides must be multiples of patch_size * merge_size = {p * m}")
    # (t, T, C, h/m, m, p, w/m, m, p)
    x = frames.reshape(grid[0], tp, channels, grid[1] // m, m, p, grid[2] // m, m, p)
    # (t, h/m, w/m, m, m, C, T, p, p): blocks row-major, a block's patches row-major, each patch (C, T, p, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(math.prod(grid), channels * tp * p * p), grid


def _pixel_bounds(pre: dict[str, Any], default_min: int, default_max: int) -> tuple[int, int]:
    """(min_pixels, max_pixels) from a preprocessor config: top-level keys win over `size`, as in transformers."""
    size = pre.get("size") or {}
    low = pre.get("min_pixels", size.get("shortest_edge", size.get("min_pixels", default_min)))
    high = pre.get("max_pixels", size.get("longest_edge", size.get("max_pixels", default_max)))
    low, high = int(low), int(high)
    if not 0 < low <= high:
        raise ValueError(f"preprocessor config: expected 0 < min_pixels <= max_pixels, got {low} and {high}")
    return low, high


def _per_channel(value: float | list[float], name: str) -> tuple[float, ...]:
    """A config's mean or std as three floats (a scalar applies to every channel)."""
    values = tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),) * 3
    if len(values) != 3:
        raise ValueError(f"preprocessor config: {name} must have 3 values, got {len(values)}")
    return values


@register
class Qwen2VLProcessor(VisionProcessor):
    """Qwen2-VL / Qwen2.5-VL: dynamic-resolution patches in merge order, `grid_thw` for M-RoPE."""

    model_types = ("qwen2_vl", "qwen2_5_vl")
    marker = "<|image_pad|>"
    image_token = "<|image_pad|>"
    video_marker = "<|video_pad|>"
    video_token = "<|video_pad|>"

    def __init__(self, config: dict[str, Any], preprocessor_config: dict[str, Any]) -> None:
        super().__init__(config, preprocessor_config)
        pre = preprocessor_config
        self.patch_size = int(pre.get("patch_size", 14))
        self.temporal_patch_size = int(pre.get("temporal_patch_size", 2))
        self.merge_size = int(pre.get("merge_size", 2))
        self.resample = resample_name(pre.get("resample", 3))
        normalize = pre.get("do_normalize", True)
        self.image_mean = (
            _per_channel(pre.get("image_mean", OPENAI_CLIP_MEAN), "image_mean") if normalize else (0.0,) * 3
        )
        self.image_std = _per_channel(pre.get("image_std", OPENAI_CLIP_STD), "image_std") if normalize else (1.0,) * 3
        self.rescale_factor = float(pre.get("rescale_factor", 1 / 255)) if pre.get("do_rescale", True) else 1.0
        self.image_pixels = _pixel_bounds(pre, IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS)
        # transformers builds the video processor from preprocessor_config.json too when there is no video config.
        self.video_pixels = _pixel_bounds(pre, VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS)

    def preprocess(self, image: Any, device: torch.device | str | None = None) -> VisionItem:
        """One image as `VisionItem("image", (h * w, C * T * p * p) float32, h * w // merge**2, {"grid_thw"})`."""
        pixels = to_tensor(image)  # uint8 (3, H, W)
        return self._encode(pixels[None], "image", self.image_pixels, device)

    def preprocess_video(
        self, frames: list[Any], device: torch.device | str | None = None, fps: float | None = None
    ) -> VisionItem:
        """One video's sampled frames (all one size) as a `VisionItem`; `fps` (the sampled frames' rate) adds
        `second_per_grid_t`, the seconds per temporal patch that Qwen2.5-VL's M-RoPE takes."""
        tensors = [to_tensor(frame) for frame in frames]
        if not tensors:
            raise ValueError("video: no frames")
        for index, frame in enumerate(tensors):
            if frame.shape != tensors[0].shape:
                raise ValueError(
                    f"video frame {index} is {tuple(frame.shape[1:])} (H, W), frame 0 is {tuple(tensors[0].shape[1:])}"
                )
        if fps is not None and not fps > 0:
            raise ValueError(f"video: fps must be positive, got {fps}")
        return self._encode(torch.stack(tensors), "video", self.video_pixels, device, fps)

    def _encode(
        self,
        pixels: torch.Tensor,
        modality: str,
        bounds: tuple[int, int],
        device: torch.device | str | None,
        fps: float | None = None,
    ) -> VisionItem:
        """uint8 frames `(F, 3, H, W)` resized, normalised and patchified on `device`."""
        height, width = pixels.shape[-2:]
        size = smart_resize(height, width, self.patch_size * self.merge_size, *bounds)
        params = {
            "family": "qwen2_vl",
            "modality": modality,
            "size": size,
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "resample": self.resample,
            "mean": self.image_mean,
            "std": self.image_std,
            "rescale_factor": self.rescale_factor,
            "fps": fps,
        }
        digest = content_hash(pixels, **params)
        if device is not None:
            pixels = pixels.to(device)
        resized = pil_resize(pixels, size, self.resample)  # uint8 (F, 3, h, w)
        normalized = rescale_normalize(resized, self.image_mean, self.image_std, self.rescale_factor)
        patches, grid = patchify(normalized, self.patch_size, self.temporal_patch_size, self.merge_size)
        meta: dict[str, Any] = {"grid_thw": grid}
        if fps is not None:
            meta["second_per_grid_t"] = self.temporal_patch_size / fps
        return VisionItem(modality, patches, math.prod(grid) // self.merge_size**2, meta, digest)
