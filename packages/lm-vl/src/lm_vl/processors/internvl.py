"""InternVL image preprocessing (transformers-native InternVL3, model_type "internvl") in torch, equal to transformers'
PIL GotOcr2 image processor with `crop_to_patches`, so that the resize and normalisation can run on a GPU.

InternVL sees an image as a grid of tiles of the vision tower's input size (448 x 448) plus, when the grid has more
than one tile, a thumbnail of the whole image at tile size. The grid (columns, rows), with `min_patches <= columns *
rows <= max_patches`, is the one whose aspect ratio is closest to the image's; on a tie the later, larger grid wins
while the image's area exceeds half the grid's. The image is resized once to the grid's canvas (Pillow's filter,
reproduced bit for bit by `pil_resize`) and cut into tiles row by row; the thumbnail is a second resize of the
original. Each tile fills `(image_size // patch_size * downsample_ratio) ** 2` language-model tokens (256 for 448 px,
14 px patches and the tower's 0.5 pixel shuffle). The chat template writes `<IMG_CONTEXT>` once per image and the
prompt holds `<img>` + `<IMG_CONTEXT>` * (tokens per tile * tiles) + `</img>` in its place.
"""

from __future__ import annotations

from typing import Any

import torch

from lm_vl.processors.base import VisionItem, VisionProcessor, content_hash, register
from lm_vl.processors.resize import pil_resize, resample_name, rescale_normalize, to_tensor

# transformers' InternVL tokenizer tokens (`start_image_token`, `context_image_token`, `end_image_token`).
START_TOKEN = "<img>"
CONTEXT_TOKEN = "<IMG_CONTEXT>"
END_TOKEN = "</img>"
# GotOcr2 / InternVL defaults for what a preprocessor_config.json or config.json leaves out.
DEFAULT_TILE = 448
DEFAULT_PATCH = 14
DEFAULT_DOWNSAMPLE = 0.5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pair(value: Any) -> tuple[int, int]:
    """An int or a `[height, width]` list as (height, width)."""
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def tile_grid(height: int, width: int, tile: tuple[int, int], min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(columns, rows) of the grid transformers' `get_optimal_tiled_canvas` picks for a `height` x `width` image."""
    # Every grid with min_tiles..max_tiles tiles, by tile count (a stable sort: columns, then rows, within a count).
    grids = sorted(
        ((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if min_tiles <= c * r <= max_tiles),
        key=lambda grid: grid[0] * grid[1],
    )
    aspect = width / height
    area = width * height
    best_diff, best = float("inf"), (1, 1)
    for columns, rows in grids:
        diff = abs(aspect - columns / rows)
        if diff < best_diff:
            best_diff, best = diff, (columns, rows)
        elif diff == best_diff and area > 0.5 * tile[0] * tile[1] * columns * rows:
            best = (columns, rows)
    return best


@register
class InternVLProcessor(VisionProcessor):
    """InternVL3's dynamic tiling: `pixel_values` `(tiles, 3, 448, 448)`, `meta` {"num_tiles": tiles}."""

    model_types = ("internvl",)
    marker = CONTEXT_TOKEN
    image_token = CONTEXT_TOKEN

    def __init__(self, config: dict[str, Any], preprocessor_config: dict[str, Any]) -> None:
        super().__init__(config, preprocessor_config)
        pre = preprocessor_config
        size = pre.get("size", {"height": DEFAULT_TILE, "width": DEFAULT_TILE})
        self.tile: tuple[int, int] = (int(size["height"]), int(size["width"]))
        self.resample = resample_name(pre.get("resample", 3))
        # transformers' InternVLProcessor passes crop_to_patches=True to the image processor whatever
        # preprocessor_config.json says (published configs carry either value): the model always sees tiles.
        self.crop_to_patches = True
        self.min_patches = int(pre.get("min_patches", 1))
        self.max_patches = int(pre.get("max_patches", 12))
        if not self.crop_to_patches and not pre.get("do_resize", True):
            raise ValueError("internvl: do_resize false without crop_to_patches leaves tiles of the image's own size")
        self.scale = float(pre.get("rescale_factor", 1 / 255)) if pre.get("do_rescale", True) else 1.0
        normalize = pre.get("do_normalize", True)
        self.mean = tuple(float(m) for m in pre.get("image_mean", IMAGENET_MEAN)) if normalize else (0.0, 0.0, 0.0)
        self.std = tuple(float(s) for s in pre.get("image_std", IMAGENET_STD)) if normalize else (1.0, 1.0, 1.0)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"internvl: image_mean and image_std need 3 values, got {self.mean} and {self.std}")

        vision = config.get("vision_config", {})
        image_size = _pair(vision.get("image_size", DEFAULT_TILE))
        patch = _pair(vision.get("patch_size", DEFAULT_PATCH))
        ratio = float(config.get("downsample_ratio", DEFAULT_DOWNSAMPLE))
        if image_size != self.tile:
            raise ValueError(f"internvl: preprocessor tile {self.tile} differs from the vision image_size {image_size}")
        # The tower's features per tile after its pixel shuffle (`InternVLModel.pixel_shuffle`'s int() truncations).
        self.tokens_per_tile = int(image_size[0] // patch[0] * ratio) * int(image_size[1] // patch[1] * ratio)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(columns, rows) of the tiles of a `height` x `width` image ((1, 1): one resize, no thumbnail)."""
        if not self.crop_to_patches or self.max_patches <= 1:
            return 1, 1
        return tile_grid(height, width, self.tile, self.min_patches, self.max_patches)

    def preprocess(self, image: Any, device: torch.device | str | None = None) -> VisionItem:
        """The tiles (and thumbnail) of one image, normalised, as a `VisionItem` of `tokens_per_tile` tokens a tile."""
        pixels = to_tensor(image)  # (3, H, W) uint8
        height, width = int(pixels.shape[-2]), int(pixels.shape[-1])
        columns, rows = self.grid(height, width)
        tile_h, tile_w = self.tile
        source = pixels.to(device) if device is not None else pixels
        if columns * rows == 1:
            tiles = pil_resize(source, self.tile, self.resample)[None]  # (1, 3, th, tw)
        else:
            canvas = pil_resize(source, (rows * tile_h, columns * tile_w), self.resample)  # (3, rows*th, cols*tw)
            # (3, rows, th, cols, tw) -> (rows, cols, 3, th, tw): tile i is row i // cols, column i % cols.
            tiles = canvas.view(3, rows, tile_h, columns, tile_w).permute(1, 3, 0, 2, 4)
            tiles = tiles.reshape(rows * columns, 3, tile_h, tile_w)
            thumbnail = pil_resize(source, self.tile, self.resample)  # (3, th, tw)
            tiles = torch.cat([tiles, thumbnail[None]])  # (rows*cols + 1, 3, th, tw)
        pixel_values = rescale_normalize(tiles, self.mean, self.std, self.scale)  # float32 (n, 3, th, tw)
        num_tiles = int(pixel_values.shape[0])
        digest = content_hash(
            pixels,
            model="internvl",
            tile=self.tile,
            resample=self.resample,
            grid=(columns, rows),
            scale=self.scale,
            mean=self.mean,
            std=self.std,
        )
        return VisionItem(
            modality="image",
            pixel_values=pixel_values,
            num_tokens=self.tokens_per_tile * num_tiles,
            meta={"num_tiles": num_tiles},
            content_hash=digest,
        )

    def replacement(self, item: VisionItem) -> str:
        """`<img>`, the item's `<IMG_CONTEXT>` tokens, `</img>` (transformers' `replace_image_token`)."""
        if item.modality != "image":
            raise ValueError(f"internvl: this processor takes images, not {item.modality}")
        return START_TOKEN + self.image_token * item.num_tokens + END_TOKEN
