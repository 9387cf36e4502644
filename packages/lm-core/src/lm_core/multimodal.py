"""Images and videos in a request: where they are in the messages, and how they reach the engine. No torch here.

A request names its media in OpenAI content parts (``{"type": "image_url", "image_url": {"url": ...}}``, or
``"image_url": "..."``; ``{"type": "image", "image": <PIL image | url | bytes>}``; ``video_url`` / ``video`` the
same way, a video also as a list of frames) or as a ``(prompt, image | [images])`` tuple. `split_media` takes them
out of the messages in order of appearance, leaving ``{"type": "image"}`` / ``{"type": "video"}`` parts where the
chat template writes the model's marker. lm-vl then loads each source under the request's `MediaPolicy` and
preprocesses it for the model (`lm_vl.processors`); the rendered prompt's markers are expanded to the model's
placeholder tokens, and the engine receives one `EngineRequest.multimodal` entry per item (`MultimodalItem`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

# Content-part types that carry media, and the modality of each.
MEDIA_PART_TYPES: dict[str, str] = {
    "image_url": "image",
    "image": "image",
    "input_image": "image",
    "video_url": "video",
    "video": "video",
}
OPENAI_DETAILS = ("auto", "low", "high")


@dataclass(frozen=True)
class MediaRef:
    """One image or video a request names: `source` is a URL or data URL, a path, bytes, a PIL image, or (a video)
    a list of frames; `where` names the field it came from (for errors); `detail` is OpenAI's image detail."""

    modality: str
    source: Any
    where: str
    detail: str | None = None
    part: str = ""  # the content part holding it (`messages[0].content[1]`)


def _media_of(part: Mapping[str, Any], where: str) -> MediaRef:
    part_where = where
    kind = str(part.get("type"))
    modality = MEDIA_PART_TYPES[kind]
    value: Any = part.get(kind)
    if value is None and kind == "input_image":  # the Responses API's flat form
        value = part.get("image_url")
    detail = None
    if isinstance(value, Mapping):
        mapping = cast(Mapping[str, Any], value)
        if "url" not in mapping:
            raise ValueError(f"{where}.{kind}.url: missing")
        detail = mapping.get("detail")
        value = mapping["url"]
        where = f"{where}.{kind}.url"
    else:
        where = f"{where}.{kind}"
    if value is None or (isinstance(value, str) and not value):
        raise ValueError(f"{where}: missing or empty")
    if detail is not None and detail not in OPENAI_DETAILS:
        raise ValueError(f"{where}: detail must be one of {', '.join(OPENAI_DETAILS)}, got {detail!r}")
    return MediaRef(modality, value, where, detail, part_where)


def split_media(messages: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[MediaRef]]:
    """(messages with each media part replaced by a bare ``{"type": modality}`` part, the media in order). Messages
    without media come back as shallow copies; a malformed media part is a ValueError naming it."""
    out: list[dict[str, Any]] = []
    refs: list[MediaRef] = []
    for i, message in enumerate(messages):
        copy = dict(message)
        content: Any = message.get("content")
        if isinstance(content, list | tuple):
            parts: list[Any] = []
            for j, part in enumerate(cast(Sequence[Any], content)):
                kind = cast(Mapping[str, Any], part).get("type") if isinstance(part, Mapping) else None
                if isinstance(kind, str) and kind in MEDIA_PART_TYPES:
                    ref = _media_of(cast(Mapping[str, Any], part), f"messages[{i}].content[{j}]")
                    refs.append(ref)
                    parts.append({"type": ref.modality})
                else:
                    parts.append(part)
            copy["content"] = parts
        out.append(copy)
    return out, refs


def has_media(messages: object) -> bool:
    """Whether OpenAI-style `messages` hold an image or video part."""
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        return False
    for message in cast(Sequence[Any], messages):
        if not isinstance(message, Mapping):
            return False
        content = cast(Mapping[str, Any], message).get("content")
        if isinstance(content, list | tuple):
            for part in cast(Sequence[Any], content):
                if isinstance(part, Mapping) and cast(Mapping[str, Any], part).get("type") in MEDIA_PART_TYPES:
                    return True
    return False


def is_media_tuple(prompt: object) -> bool:
    """Whether `prompt` is a ``(prompt, image | [images])`` tuple (a text prompt and its images)."""
    return isinstance(prompt, tuple) and len(cast(tuple[Any, ...], prompt)) == 2 and isinstance(prompt[0], str)


def prompt_with_images(prompt: str, images: Any) -> list[dict[str, Any]]:
    """The one user message of a ``(prompt, image | [images])`` tuple: the images first, then the text (the layout
    the families' own examples use)."""
    if not prompt:
        raise ValueError("a (prompt, images) tuple needs a non-empty string prompt first")
    items = list(cast(Sequence[Any], images)) if isinstance(images, list | tuple) else [images]
    if not items:
        raise ValueError("a (prompt, images) tuple needs at least one image")
    parts: list[dict[str, Any]] = [{"type": "image", "image": item} for item in items]
    parts.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": parts}]


@dataclass(frozen=True)
class MultimodalItem:
    """What the engine receives for one image or video (`EngineRequest.multimodal` holds these as dicts).

    Placeholder tokens `[offset, offset + length)` of the prompt take the vision tower's output for this item.
    `pixel_values` and `meta` are the family's (lm-vl's `VisionItem`), opaque here; `content_hash` identifies the
    pixels and every parameter that shaped them (equal hashes, equal features: the key of the encoder cache and part
    of the prefix-cache key of the blocks the item covers)."""

    modality: str
    offset: int
    length: int
    pixel_values: Any
    meta: dict[str, Any]
    content_hash: str

    def as_dict(self) -> dict[str, Any]:
        """The `EngineRequest.multimodal` entry."""
        return {
            "modality": self.modality,
            "offset": self.offset,
            "length": self.length,
            "pixel_values": self.pixel_values,
            "meta": self.meta,
            "content_hash": self.content_hash,
        }


def check_items(items: Sequence[Mapping[str, Any]], prompt_len: int) -> None:
    """ValueError naming the problem unless `items` (`MultimodalItem` dicts) are ordered, non-overlapping spans inside
    a prompt of `prompt_len` tokens, each with a content hash."""
    end = 0
    for k, item in enumerate(items):
        for key in ("modality", "offset", "length", "pixel_values", "content_hash"):
            if key not in item:
                raise ValueError(f"multimodal[{k}]: missing {key!r}")
        offset, length = item["offset"], item["length"]
        if not isinstance(offset, int) or not isinstance(length, int) or length < 1 or offset < end:
            raise ValueError(
                f"multimodal[{k}]: span ({offset!r}, {length!r}) must be a positive length after the previous span"
            )
        if offset + length > prompt_len:
            raise ValueError(f"multimodal[{k}]: span [{offset}, {offset + length}) is past the prompt ({prompt_len})")
        if not isinstance(item["content_hash"], str) or not item["content_hash"]:
            raise ValueError(f"multimodal[{k}]: content_hash must be a non-empty string")
        end = offset + length
