"""Pillow's `Image.resize` for 8-bit images, reproduced in torch to the bit, on any device and for a batch.

The families' published preprocessing (transformers' PIL image processors) resizes with Pillow. Pillow resamples
separably, a horizontal pass and then a vertical one, each a weighted sum over a filter window in 22-bit fixed point
with 8-bit rounding in between. A float resize (`torch.nn.functional.interpolate`, even with antialias) differs from
that by up to a few levels of 255, which after normalisation is 1e-2, not the 1e-5 a processor must match. So this
module computes Pillow's window bounds and weights with the same float64 operations in the same order, turns them
into the same fixed-point integers, and applies each pass as one matrix product in float64: every product and
partial sum is an integer below 2**53, so the sum is exact and the result equals Pillow's for every pixel.

Shapes: images are uint8 `(C, H, W)` or `(N, C, H, W)`; a pass multiplies by a `(out, in)` weight matrix.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import numpy as np
import torch

Resample = Literal["bilinear", "bicubic"]

# Fixed-point fraction bits of Pillow's 8-bit resampling (32 bits, 8 for the value, 2 for overshoot).
PRECISION_BITS = 22
# Filter half-widths at scale 1.
SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}
# Pillow's resample codes (`PIL.Image.Resampling`), which transformers' processor configs store.
PIL_CODES: dict[int, Resample] = {2: "bilinear", 3: "bicubic"}


def resample_name(value: int | str) -> Resample:
    """A processor config's `resample` (Pillow's integer code or a name) as a filter name this module implements."""
    if isinstance(value, str):
        name = value.lower()
        if name in SUPPORT:
            return name  # type: ignore[return-value]
    elif value in PIL_CODES:
        return PIL_CODES[value]
    raise ValueError(f"resample: {value!r} is not supported (bilinear = 2, bicubic = 3)")


def _filter(name: Resample, x: np.ndarray) -> np.ndarray:
    """The filter at `x` (float64), each branch evaluated in Pillow's order of operations."""
    x = np.abs(x)
    if name == "bilinear":
        return np.where(x < 1.0, 1.0 - x, 0.0)
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


# Weight matrices of at most this many entries are kept for reuse (a server sees the same sizes again and again);
# larger ones (extreme aspect ratios) are rebuilt each time rather than held.
_CACHED_ENTRIES = 1 << 21


def _weights(in_size: int, out_size: int, name: Resample) -> np.ndarray:
    """The `(out_size, in_size)` fixed-point weight matrix of one pass (integers stored as float64)."""
    if in_size * out_size <= _CACHED_ENTRIES:
        return _cached_weights(in_size, out_size, name)
    return _build_weights(in_size, out_size, name)


@lru_cache(maxsize=128)
def _cached_weights(in_size: int, out_size: int, name: Resample) -> np.ndarray:
    return _build_weights(in_size, out_size, name)


def _build_weights(in_size: int, out_size: int, name: Resample) -> np.ndarray:
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = SUPPORT[name] * filterscale
    ksize = math.ceil(support) * 2 + 1
    out = np.arange(out_size, dtype=np.float64)
    center = (out + 0.5) * scale
    # C's (int) cast truncates towards zero; a negative start is then raised to 0.
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize)
    inside = taps[None, :] < xmax[:, None]
    w = _filter(name, ((taps[None, :] + xmin[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale))
    w = np.where(inside, w, 0.0)
    # The window's sum, accumulated left to right as Pillow does (a pairwise sum may round differently).
    total = np.zeros(out_size)
    for k in range(ksize):
        total = total + w[:, k]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    fixed = np.where(w < 0, np.trunc(-0.5 + w * (1 << PRECISION_BITS)), np.trunc(0.5 + w * (1 << PRECISION_BITS)))
    fixed = np.where(inside, fixed, 0.0)
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    cols = np.clip(xmin[:, None] + taps[None, :], 0, in_size - 1)
    rows = np.broadcast_to(out[:, None].astype(np.int64), cols.shape)
    np.add.at(matrix, (rows[inside], cols[inside]), fixed[inside])
    return matrix


def _pass(images: torch.Tensor, weights: np.ndarray, dim: int) -> torch.Tensor:
    """One pass along `dim` (-1: width, -2: height) of float64 integer-valued images; rounds and clamps to 0..255."""
    w = torch.from_numpy(weights).to(images.device)
    acc = images @ w.T if dim == -1 else w @ images
    return torch.clamp(torch.floor((acc + (1 << (PRECISION_BITS - 1))) / (1 << PRECISION_BITS)), 0, 255)


def pil_resize(images: torch.Tensor, size: tuple[int, int], resample: str | int = "bicubic") -> torch.Tensor:
    """`images` (uint8 `(C, H, W)` or `(N, C, H, W)`) resized to `size` = (height, width) as Pillow resizes an 8-bit
    image with `resample` (bilinear or bicubic, or Pillow's code), bit for bit. Returns uint8 on the input's device."""
    if images.dtype != torch.uint8:
        raise ValueError(f"images: expected uint8 pixels, got {images.dtype}")
    if images.dim() not in (3, 4):
        raise ValueError(f"images: expected (C, H, W) or (N, C, H, W), got shape {tuple(images.shape)}")
    height, width = int(size[0]), int(size[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"size: expected positive (height, width), got {size}")
    name = resample_name(resample)
    in_h, in_w = images.shape[-2], images.shape[-1]
    if (in_h, in_w) == (height, width):
        return images.clone()
    out = images.to(torch.float64)
    passes = [(in_w != width, -1, in_w, width), (in_h != height, -2, in_h, height)]
    if _vertical_first(in_h, in_w, height, width):
        passes.reverse()
    for needed, dim, size_in, size_out in passes:
        if needed:
            out = _pass(out, _weights(size_in, size_out, name), dim)
    return out.to(torch.uint8)


def _pillow_major() -> int:
    try:
        import PIL
    except ImportError:  # pragma: no cover - pillow is a dependency
        return 13
    return int(PIL.__version__.split(".")[0])


def _vertical_first(in_h: int, in_w: int, out_h: int, out_w: int) -> bool:
    """Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many pixels as the width
    (older Pillow always runs the horizontal pass first). The order changes the 8-bit rounding between the passes."""
    if _PILLOW_MAJOR < 13:
        return False
    shrink_h = in_h - out_h
    return shrink_h > 0 and shrink_h > (in_w - out_w) * 2


def to_tensor(image: object) -> torch.Tensor:
    """A PIL image (converted to RGB; transparency blended onto white, as transformers' `convert_rgb` does) or an
    `(H, W, 3)` uint8 array as a uint8 `(3, H, W)` tensor."""
    from PIL import Image

    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        array = np.array(image.convert("RGB"))
    elif isinstance(image, np.ndarray):
        array = image
    elif isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image: expected a uint8 (3, H, W) tensor, got {image.dtype} {tuple(image.shape)}")
        return image
    else:
        raise ValueError(f"image: expected a PIL image, an array or a tensor, got {type(image).__name__}")
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image: expected a uint8 (H, W, 3) array, got {array.dtype} {array.shape}")
    if not array.flags.writeable:  # torch.from_numpy wants a writable array; permute+contiguous copies anyway
        array = array.copy()
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def rescale_normalize(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], scale: float = 1 / 255
) -> torch.Tensor:
    """uint8 `(..., C, H, W)` to float32 `(x * scale - mean) / std` per channel, rescaled in float64 first as
    transformers' `rescale` does."""
    x = (images.to(torch.float64) * scale).to(torch.float32)
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return (x - m) / s


_PILLOW_MAJOR = _pillow_major()
