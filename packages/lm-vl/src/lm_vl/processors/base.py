"""The contract between a family's image preprocessing and the engine.

A `VisionProcessor` turns one image (or one video's frames) into a `VisionItem`: the pixel tensor the family's vision
tower takes, how many placeholder tokens the item fills in the language model's sequence, and the position metadata
the language model needs (Qwen's `grid_thw`, InternVL's tile count). It also says how the item appears in the prompt:
the chat template writes `marker` once per image, and `expand_prompt` replaces each marker with the family's exact
expansion (`replacement`), which holds `num_tokens` copies of the placeholder token `image_token`. After
tokenization, `placeholder_spans` finds each item's run of placeholder ids; the engine scatters the vision tower's
output rows into those positions.

Processors are built from a checkpoint folder (`config.json` and `preprocessor_config.json`) by `load_processor`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

import torch

# `VisionProcessor` subclasses by the `model_type` of the checkpoint's config.json.
_REGISTRY: dict[str, type[VisionProcessor]] = {}
# The family modules under lm_vl.processors; each registers its processor when imported.
FAMILY_MODULES = ("gemma3", "internvl", "llava", "qwen2_vl")


@dataclass
class VisionItem:
    """One image or video after preprocessing.

    `pixel_values`: the family's layout, float32 (Qwen: `(patches, C * temporal_patch * patch * patch)`; CLIP, SigLIP:
    `(1, 3, H, W)`; InternVL: `(tiles, 3, 448, 448)`). `num_tokens`: placeholder tokens it fills (the rows of the
    vision tower's projected output). `meta`: what the tower and the language model's positions need, JSON-like.
    `content_hash`: SHA-256 over the input pixels and every parameter that shaped `pixel_values`, so that equal hashes
    mean equal vision-tower outputs (the key of the encoder cache and of prefix-cache blocks over the item).
    """

    modality: str
    pixel_values: torch.Tensor
    num_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)
    content_hash: str = ""


class VisionProcessor:
    """A family's preprocessing; subclasses set the class attributes and implement `preprocess`."""

    #: config.json `model_type` values this class serves.
    model_types: ClassVar[tuple[str, ...]] = ()
    #: What the chat template writes for each image (replaced by `replacement`).
    marker: ClassVar[str] = ""
    #: The placeholder token whose positions take the vision tower's output.
    image_token: ClassVar[str] = ""
    #: The same two for videos (families without video leave them empty).
    video_marker: ClassVar[str] = ""
    video_token: ClassVar[str] = ""

    def __init__(self, config: dict[str, Any], preprocessor_config: dict[str, Any]) -> None:
        self.config = config
        self.preprocessor_config = preprocessor_config

    @classmethod
    def from_pretrained(cls, path: str | Path) -> VisionProcessor:
        """The processor of the checkpoint folder `path` (its config.json and preprocessor_config.json)."""
        folder = Path(path)
        config = json.loads((folder / "config.json").read_text())
        pre = folder / "preprocessor_config.json"
        return cls(config, json.loads(pre.read_text()) if pre.exists() else {})

    def preprocess(self, image: Any, device: torch.device | str | None = None) -> VisionItem:
        """One image (PIL, uint8 `(H, W, 3)` array or uint8 `(3, H, W)` tensor) as a `VisionItem`; the resize and
        normalisation run on `device` (default: the CPU)."""
        raise NotImplementedError

    def preprocess_video(self, frames: list[Any], device: torch.device | str | None = None) -> VisionItem:
        """One video (its sampled frames, each as `preprocess` takes an image) as a `VisionItem`."""
        raise ValueError(f"{type(self).__name__}: this model takes no video")

    def replacement(self, item: VisionItem) -> str:
        """The prompt text that stands for `item` in place of its marker."""
        token = self.video_token if item.modality == "video" else self.image_token
        return token * item.num_tokens

    def expand_prompt(self, text: str, items: list[VisionItem]) -> str:
        """`text` with its markers replaced by the items' expansions; `items` come in the order their markers appear
        (images and videos interleaved as in the prompt)."""
        markers = {m: marker for m, marker in (("image", self.marker), ("video", self.video_marker)) if marker}
        pieces: list[str] = []
        rest = text
        for index, item in enumerate(items):
            if item.modality not in markers:
                raise ValueError(f"{type(self).__name__}: this model takes no {item.modality}")
            found = [(rest.find(marker), m, marker) for m, marker in markers.items() if marker in rest]
            if not found:
                raise ValueError(f"the prompt has fewer image and video markers than items: item {index} has none")
            at, modality, marker = min(found)
            if modality != item.modality:
                raise ValueError(f"item {index} is an {item.modality}, the prompt's next marker is for an {modality}")
            pieces += [rest[:at], self.replacement(item)]
            rest = rest[at + len(marker) :]
        for marker in markers.values():
            if marker in rest:
                raise ValueError(f"the prompt has more markers ({marker!r}) than images and videos given")
        return "".join(pieces) + rest

    def placeholder_ids(self, token_to_id: Any) -> dict[str, int]:
        """{modality: placeholder token id}, given the tokenizer's `token_to_id` (a callable or a dict)."""
        lookup = token_to_id if callable(token_to_id) else token_to_id.get
        out: dict[str, int] = {}
        for modality, token in (("image", self.image_token), ("video", self.video_token)):
            if token:
                token_id = lookup(token)
                if token_id is None:
                    raise ValueError(f"the tokenizer has no token {token!r} ({modality} placeholder)")
                out[modality] = int(cast(int, token_id))
        return out


def placeholder_spans(token_ids: list[int], items: list[VisionItem], ids: dict[str, int]) -> list[tuple[int, int]]:
    """[(offset, length)] of each item's placeholder tokens in `token_ids`, items in prompt order: item k takes the
    next `num_tokens` placeholder ids of its modality. A run too short, a placeholder of the wrong modality, or
    placeholders left over or missing (a template or tokenizer that split, merged or dropped one) is a ValueError."""
    by_id = {token_id: modality for modality, token_id in ids.items()}
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(token_ids):
        modality = by_id.get(token_ids[i])
        if modality is None:
            i += 1
            continue
        k = len(spans)
        if k == len(items):
            raise ValueError(f"the prompt holds more {modality} placeholders than the {len(items)} items fill")
        item = items[k]
        if item.modality != modality:
            raise ValueError(f"item {k} is an {item.modality}, its placeholders at position {i} are for an {modality}")
        n = item.num_tokens
        if token_ids[i : i + n] != [token_ids[i]] * n:
            end = min(i + n, len(token_ids))
            run = next((j for j in range(i, end) if token_ids[j] != token_ids[i]), end)
            raise ValueError(
                f"the {modality} at prompt position {i} has {run - i} placeholder tokens, its features fill {n}"
            )
        spans.append((i, n))
        i += n
    if len(spans) != len(items):
        raise ValueError(f"the prompt holds placeholders for {len(spans)} of its {len(items)} images and videos")
    return spans


def content_hash(pixels: torch.Tensor, **params: Any) -> str:
    """SHA-256 over uint8 source pixels (any shape) and the processing parameters that shape the output."""
    digest = hashlib.sha256()
    digest.update(json.dumps(params, sort_keys=True, default=str).encode())
    digest.update(str(tuple(pixels.shape)).encode())
    digest.update(pixels.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


def register(cls: type[VisionProcessor]) -> type[VisionProcessor]:
    """Class decorator: `cls` serves its `model_types`."""
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls
    return cls


def processor_class(model_type: str) -> type[VisionProcessor]:
    """The `VisionProcessor` subclass serving `model_type`; a ValueError names the known ones."""
    import importlib

    for module in FAMILY_MODULES:
        importlib.import_module(f"lm_vl.processors.{module}")
    try:
        return _REGISTRY[model_type]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"model_type {model_type!r} has no vision processor (known: {known})") from None


def load_processor(path: str | Path) -> VisionProcessor:
    """The vision processor of the checkpoint at `path`, chosen by its config.json `model_type`."""
    config = json.loads((Path(path) / "config.json").read_text())
    return processor_class(str(config.get("model_type", ""))).from_pretrained(path)
