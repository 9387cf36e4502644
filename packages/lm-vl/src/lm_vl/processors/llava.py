"""LLaVA-1.5 image preprocessing (a CLIP vision tower) in torch, equal to transformers' PIL processors.

transformers' `LlavaImageProcessorPil` (and `CLIPImageProcessorPil`, which is the same without `do_pad`) optionally
pads the image to a square with the mean colour, resizes its shortest edge to `size["shortest_edge"]` (the long edge
to `int(shortest * long / short)`) with Pillow, center-crops to `crop_size` (zero-padding an image smaller than the
crop), rescales and normalises. Here the same steps run on uint8 tensors on any device: `pil_resize` equals Pillow to
the bit, cropping and padding are exact, and `rescale_normalize` repeats transformers' float64-then-float32 arithmetic,
so `pixel_values` match the PIL processor's to float32 rounding.

`LlavaProcessor` (transformers) replaces each `<image>` in the prompt with `(H // patch) * (W // patch)` copies of
`<image>`, plus one for the CLS feature when `vision_feature_select_strategy` is "full" (the published
"default" strategy drops it): 576 for llava-1.5's 336 px crop and 14 px patches.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lm_vl.processors.base import VisionItem, VisionProcessor, content_hash, register
from lm_vl.processors.resize import pil_resize, resample_name, rescale_normalize, to_tensor

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, the defaults of its CLIP and LLaVA image processors.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def option(config: dict[str, Any], key: str, default: Any) -> Any:
    """`config[key]`, or `default` where the key is missing or null (as transformers reads a processor config)."""
    value = config.get(key)
    return default if value is None else value


def size_dict(value: Any, name: str, default_to_square: bool) -> dict[str, int]:
    """A processor config's size (dict, int or `[h, w]`) as a dict, as transformers' `get_size_dict` converts it."""
    if isinstance(value, int):
        return {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    if isinstance(value, dict) and set(value) in ({"shortest_edge"}, {"height", "width"}):
        return {key: int(v) for key, v in value.items()}
    raise ValueError(f"{name}: {value!r} is not supported (expected {{'shortest_edge'}} or {{'height', 'width'}})")


def shortest_edge_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    """(height, width) with the short edge at `shortest`, as transformers' `get_resize_output_image_size`."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest * long / short)
    return (new_long, shortest) if width <= height else (shortest, new_long)


def pad_to_square(image: torch.Tensor, color: tuple[int, ...]) -> torch.Tensor:
    """uint8 `(C, H, W)` centred on a `(C, M, M)` canvas of `color`, M = max(H, W) (LLaVA's `pad_to_square`)."""
    channels, height, width = image.shape
    if height == width:
        return image
    side = max(height, width)
    fill = torch.zeros(channels, dtype=torch.uint8)
    fill[: len(color)] = torch.tensor(color, dtype=torch.uint8)
    canvas = fill.to(image.device).view(-1, 1, 1).expand(channels, side, side).clone()
    if width > height:
        start = (side - height) // 2
        canvas[:, start : start + height, :] = image
    else:
        start = (side - width) // 2
        canvas[:, :, start : start + width] = image
    return canvas


def center_crop(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`(..., H, W)` cropped to `(height, width)` about its centre, zero-padded where smaller, as transformers'
    `center_crop` does (the same offsets for odd differences)."""
    in_h, in_w = image.shape[-2], image.shape[-1]
    top, left = (in_h - height) // 2, (in_w - width) // 2
    if top >= 0 and left >= 0:
        return image[..., top : top + height, left : left + width]
    new_h, new_w = max(height, in_h), max(width, in_w)
    canvas = image.new_zeros((*image.shape[:-2], new_h, new_w))
    pad_top, pad_left = math.ceil((new_h - in_h) / 2), math.ceil((new_w - in_w) / 2)
    canvas[..., pad_top : pad_top + in_h, pad_left : pad_left + in_w] = image
    top, left = top + pad_top, left + pad_left
    return canvas[..., max(0, top) : min(new_h, top + height), max(0, left) : min(new_w, left + width)]


@register
class LlavaProcessor(VisionProcessor):
    """LLaVA-1.5: CLIP preprocessing (optional pad to square, shortest-edge resize, center crop, normalise)."""

    model_types = ("llava",)
    marker = "<image>"
    image_token = "<image>"

    def __init__(self, config: dict[str, Any], preprocessor_config: dict[str, Any]) -> None:
        super().__init__(config, preprocessor_config)
        pre = preprocessor_config
        # LlavaConfig's default vision tower is CLIP ViT-L/14 at 336 px.
        vision = config.get("vision_config") or {}
        self.patch_size = int(option(vision, "patch_size", 14))
        self.tower_size = int(option(vision, "image_size", 336))
        self.strategy = str(option(config, "vision_feature_select_strategy", "default"))
        if self.strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy: {self.strategy!r} is not 'default' or 'full'")
        # Defaults are those of transformers' LlavaImageProcessorPil.
        self.do_pad = bool(option(pre, "do_pad", False))
        self.do_resize = bool(option(pre, "do_resize", True))
        self.size = size_dict(option(pre, "size", {"shortest_edge": 224}), "size", default_to_square=False)
        self.resample = resample_name(option(pre, "resample", 3))
        self.do_center_crop = bool(option(pre, "do_center_crop", True))
        self.crop_size = size_dict(option(pre, "crop_size", {"height": 224, "width": 224}), "crop_size", True)
        if "height" not in self.crop_size:
            raise ValueError(f"crop_size: expected height and width, got {self.crop_size}")
        self.do_rescale = bool(option(pre, "do_rescale", True))
        self.rescale_factor = float(option(pre, "rescale_factor", 1 / 255))
        self.do_normalize = bool(option(pre, "do_normalize", True))
        self.mean = tuple(float(m) for m in option(pre, "image_mean", CLIP_MEAN))
        self.std = tuple(float(s) for s in option(pre, "image_std", CLIP_STD))
        # LLaVA pads with the mean colour in 8 bits, truncated (`int(m * 255)`).
        self.pad_color = tuple(int(m * 255) for m in self.mean) if self.mean else (0,)
        fixed = self._fixed_output_size()
        if fixed is not None and fixed != (self.tower_size, self.tower_size):
            raise ValueError(
                f"crop_size/size: the processor makes {fixed[0]}x{fixed[1]} images, "
                f"the vision tower (vision_config.image_size) takes {self.tower_size}x{self.tower_size}"
            )

    def _fixed_output_size(self) -> tuple[int, int] | None:
        """The (height, width) of every output, or None where it depends on the image."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize and "height" in self.size:
            return self.size["height"], self.size["width"]
        return None

    def num_tokens(self, height: int, width: int) -> int:
        """Placeholder tokens of a `(height, width)` pixel input, as transformers' `LlavaProcessor` counts them."""
        patches = (height // self.patch_size) * (width // self.patch_size)
        return patches + (1 if self.strategy == "full" else 0)

    def preprocess(self, image: Any, device: torch.device | str | None = None) -> VisionItem:
        """One image as CLIP `pixel_values` `(1, 3, H, W)` float32 and its placeholder count."""
        pixels = to_tensor(image)  # uint8 (3, H, W) on the CPU
        digest = content_hash(pixels, family="llava", **self._params())
        x = pixels.to(device) if device is not None else pixels
        if self.do_pad:
            x = pad_to_square(x, self.pad_color)  # (3, M, M)
        if self.do_resize:
            height, width = x.shape[-2], x.shape[-1]
            if "shortest_edge" in self.size:
                target = shortest_edge_size(height, width, self.size["shortest_edge"])
            else:
                target = (self.size["height"], self.size["width"])
            x = pil_resize(x, target, self.resample)
        if self.do_center_crop:
            x = center_crop(x, self.crop_size["height"], self.crop_size["width"])  # (3, crop_h, crop_w)
        mean = self.mean if self.do_normalize else (0.0,) * x.shape[0]
        std = self.std if self.do_normalize else (1.0,) * x.shape[0]
        values = rescale_normalize(x, mean, std, self.rescale_factor if self.do_rescale else 1.0)
        height, width = values.shape[-2], values.shape[-1]
        if (height, width) != (self.tower_size, self.tower_size):
            raise ValueError(f"image: preprocessed to {height}x{width}, the vision tower takes {self.tower_size}")
        return VisionItem("image", values.unsqueeze(0), self.num_tokens(height, width), {}, digest)

    def _params(self) -> dict[str, Any]:
        """Every setting that shapes `pixel_values` (part of the content hash)."""
        return {
            "do_pad": self.do_pad,
            "pad_color": self.pad_color,
            "do_resize": self.do_resize,
            "size": self.size,
            "resample": self.resample,
            "do_center_crop": self.do_center_crop,
            "crop_size": self.crop_size,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "mean": self.mean,
            "std": self.std,
        }
