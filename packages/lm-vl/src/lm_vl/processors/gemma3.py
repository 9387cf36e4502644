"""Gemma 3 image preprocessing (a SigLIP vision tower) in torch, equal to transformers' PIL processor.

transformers' `Gemma3ImageProcessorPil` resizes every image to `size` (896x896 published, ignoring the aspect ratio)
with Pillow's bilinear filter, rescales and normalises with mean = std = 0.5. Here the same steps run on uint8
tensors on any device: `pil_resize` equals Pillow to the bit and `rescale_normalize` repeats transformers'
float64-then-float32 arithmetic, so `pixel_values` match the PIL processor's to float32 rounding.

The chat template writes `<start_of_image>` once per image; `Gemma3Processor` replaces it with
`"\\n\\n<start_of_image>" + "<image_soft_token>" * mm_tokens_per_image + "<end_of_image>\\n\\n"`, and the vision
tower's pooled output (`mm_tokens_per_image` rows, 256 published) fills the soft tokens. Pan-and-scan (extra crops
of wide or tall images, each with its own sequence) is off in the published configs and not implemented here, so a
config that turns it on is refused rather than silently processed differently.
"""

from __future__ import annotations

from typing import Any

import torch

from lm_vl.processors.base import VisionItem, VisionProcessor, content_hash, register
from lm_vl.processors.resize import pil_resize, resample_name, rescale_normalize, to_tensor

# transformers' IMAGENET_STANDARD_MEAN / _STD, the defaults of its Gemma 3 image processor.
STANDARD_MEAN = (0.5, 0.5, 0.5)
STANDARD_STD = (0.5, 0.5, 0.5)
BOI_TOKEN = "<start_of_image>"
EOI_TOKEN = "<end_of_image>"


def _option(config: dict[str, Any], key: str, default: Any) -> Any:
    """`config[key]`, or `default` where the key is missing or null (as transformers reads a processor config)."""
    value = config.get(key)
    return default if value is None else value


def _size(value: Any) -> tuple[int, int]:
    """A processor config's `size` as (height, width): `{"height", "width"}`, an int (square) or `[h, w]`."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    if isinstance(value, dict) and set(value) == {"height", "width"}:
        return int(value["height"]), int(value["width"])
    raise ValueError(f"size: {value!r} is not supported (expected {{'height': h, 'width': w}})")


@register
class Gemma3Processor(VisionProcessor):
    """Gemma 3: SigLIP preprocessing (fixed-size bilinear resize, normalise); no pan-and-scan."""

    model_types = ("gemma3",)
    marker = BOI_TOKEN
    image_token = "<image_soft_token>"

    def __init__(self, config: dict[str, Any], preprocessor_config: dict[str, Any]) -> None:
        super().__init__(config, preprocessor_config)
        pre = preprocessor_config
        if pre.get("do_pan_and_scan"):
            raise ValueError("do_pan_and_scan: pan-and-scan is not supported (the published configs leave it off)")
        self.tokens = int(_option(config, "mm_tokens_per_image", 256))
        seq_length = pre.get("image_seq_length")
        if seq_length is not None and int(seq_length) != self.tokens:
            raise ValueError(
                f"image_seq_length: the preprocessor config says {seq_length}, "
                f"config.json's mm_tokens_per_image says {self.tokens}"
            )
        # Defaults are those of transformers' Gemma3ImageProcessorPil.
        self.do_resize = bool(_option(pre, "do_resize", True))
        self.size = _size(_option(pre, "size", {"height": 224, "width": 224}))
        self.resample = resample_name(_option(pre, "resample", 2))
        self.do_rescale = bool(_option(pre, "do_rescale", True))
        self.rescale_factor = float(_option(pre, "rescale_factor", 1 / 255))
        self.do_normalize = bool(_option(pre, "do_normalize", True))
        self.mean = tuple(float(m) for m in _option(pre, "image_mean", STANDARD_MEAN))
        self.std = tuple(float(s) for s in _option(pre, "image_std", STANDARD_STD))
        tower = (config.get("vision_config") or {}).get("image_size")
        if tower is not None and self.do_resize and self.size != (int(tower), int(tower)):
            raise ValueError(f"size: the processor makes {self.size} images, vision_config.image_size is {tower}")

    def preprocess(self, image: Any, device: torch.device | str | None = None) -> VisionItem:
        """One image as SigLIP `pixel_values` `(1, 3, H, W)` float32 (896x896 published)."""
        pixels = to_tensor(image)  # uint8 (3, H, W) on the CPU
        digest = content_hash(pixels, family="gemma3", **self._params())
        x = pixels.to(device) if device is not None else pixels
        if self.do_resize:
            x = pil_resize(x, self.size, self.resample)  # (3, size_h, size_w)
        mean = self.mean if self.do_normalize else (0.0,) * x.shape[0]
        std = self.std if self.do_normalize else (1.0,) * x.shape[0]
        values = rescale_normalize(x, mean, std, self.rescale_factor if self.do_rescale else 1.0)
        return VisionItem("image", values.unsqueeze(0), self.tokens, {}, digest)

    def replacement(self, item: VisionItem) -> str:
        """Gemma3Processor's `full_image_sequence`: the soft tokens between begin/end-of-image, blank lines around."""
        return f"\n\n{BOI_TOKEN}{self.image_token * item.num_tokens}{EOI_TOKEN}\n\n"

    def _params(self) -> dict[str, Any]:
        """Every setting that shapes `pixel_values` (part of the content hash)."""
        return {
            "do_resize": self.do_resize,
            "size": self.size,
            "resample": self.resample,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "mean": self.mean,
            "std": self.std,
        }
