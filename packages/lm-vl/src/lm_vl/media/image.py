"""Loading images from request input: `load_image`, `load_images` and their async forms, returning RGB PIL images."""

from __future__ import annotations

import asyncio
import functools
import io
import os
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import TypeAlias

from PIL import Image

from lm_vl.media.errors import MediaError, refused
from lm_vl.media.policy import MediaPolicy
from lm_vl.media.sources import source_bytes

# What a request or a caller may hand over: a URL, data URL, `file:` URL or path (str or path-like), encoded image
# bytes, or an already-open PIL image.
ImageSource: TypeAlias = str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image
_DEFAULT_POLICY = MediaPolicy()
# RGB composited on white: the colour stored under fully transparent pixels is arbitrary (often black), and dropping
# the alpha channel would show it.
_BACKGROUND = (255, 255, 255)


def load_image(source: ImageSource, policy: MediaPolicy | None = None) -> Image.Image:
    """An RGB image decoded from `source` under `policy` (default: the strict `MediaPolicy()`).

    A PIL image passed in is trusted as to format but still held to the pixel cap. Raises `MediaError` (400 or
    422, `param="image_url"`) for anything refused or failed.
    """
    policy = _DEFAULT_POLICY if policy is None else policy
    if isinstance(source, Image.Image):
        check_pixels(source.size, policy)
        return to_rgb(source)
    return decode_image(source_bytes(source, policy, "image"), policy)


def load_images(sources: Sequence[ImageSource], policy: MediaPolicy | None = None) -> list[Image.Image]:
    """`load_image` for each source of one request, refused as a whole past `policy.limit_per_prompt`."""
    policy = _DEFAULT_POLICY if policy is None else policy
    check_item_count(sources, policy)
    return [load_image(source, policy) for source in sources]


async def aload_image(
    source: ImageSource, policy: MediaPolicy | None = None, *, executor: Executor | None = None
) -> Image.Image:
    """`load_image` run in `executor` (default: the event loop's), so fetching and decoding never block the loop.

    Cancelling the awaiting task does not stop the worker thread; the policy's timeouts and caps bound its work.
    """
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, functools.partial(load_image, source, policy))


async def aload_images(
    sources: Sequence[ImageSource], policy: MediaPolicy | None = None, *, executor: Executor | None = None
) -> list[Image.Image]:
    """`load_images` with the images fetched and decoded concurrently in `executor`; the count is checked first."""
    policy = _DEFAULT_POLICY if policy is None else policy
    check_item_count(sources, policy)
    return list(await asyncio.gather(*(aload_image(source, policy, executor=executor) for source in sources)))


def decode_image(data: bytes, policy: MediaPolicy) -> Image.Image:
    """Decode encoded image bytes to RGB, checking format, pixel count and frame count before any pixel is decoded.

    `Image.open` reads only the header and is given the allowed formats alone, so no other PIL decoder ever sees
    request bytes. Truncated data is an error (ImageFile.LOAD_TRUNCATED_IMAGES is left off). Animated images
    yield their first frame.
    """
    formats = sorted(policy.allowed_formats)
    canvas = _webp_canvas_size(data)
    if canvas is not None:
        check_pixels(canvas, policy)
    try:
        image = Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError as exc:
        raise refused(f"image has more pixels than PIL will decode ({exc})", "too_many_pixels") from None
    except Image.UnidentifiedImageError:
        raise refused(
            f"data is not an image in an allowed format ({', '.join(formats)})", "unsupported_format"
        ) from None
    except Exception as exc:  # PIL's header parsers raise assorted exception types on hostile input
        raise refused(f"image header is corrupt ({type(exc).__name__})", "corrupt_image") from None
    with image:
        # A JPEG with a multi-picture (MPO) index opens as MPO; its first picture is a plain JPEG.
        image_format = "JPEG" if image.format == "MPO" else image.format
        if image_format not in policy.allowed_formats:
            raise refused(f"image format {image.format} is not allowed", "unsupported_format")
        check_pixels(image.size, policy)
        try:
            num_frames = getattr(image, "n_frames", 1)
            if num_frames > policy.max_image_frames:
                raise refused(
                    f"animated image has {num_frames} frames; the limit is {policy.max_image_frames}",
                    "too_many_frames",
                )
            image.load()
            return to_rgb(image)
        except MediaError:
            raise
        except Exception as exc:  # truncated or corrupt pixel data, in whichever form the plugin reports it
            raise refused(f"image data is truncated or corrupt ({type(exc).__name__})", "corrupt_image") from None


def _webp_canvas_size(data: bytes) -> tuple[int, int] | None:
    """The canvas size an extended (VP8X) WebP declares, or None for anything else.

    PIL opens an animated WebP by creating libwebp's animation decoder, which allocates canvas buffers before
    `Image.open` returns, so this size is checked against the cap before PIL sees the data.
    """
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:16] != b"WEBPVP8X":
        return None
    # VP8X payload (from byte 20): 1 byte of flags, 3 reserved, then canvas width - 1 and height - 1 as 24-bit LE.
    return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")


def check_pixels(size: tuple[int, int], policy: MediaPolicy) -> None:
    """Refuse (400) an image whose width x height exceeds `policy.max_image_pixels`."""
    width, height = size
    if width * height > policy.max_image_pixels:
        raise refused(
            f"image of {width}x{height} = {width * height} pixels exceeds the limit of {policy.max_image_pixels}",
            "too_many_pixels",
        )


def check_item_count(sources: Sequence[object], policy: MediaPolicy) -> None:
    """Refuse (400) a request naming more than `policy.limit_per_prompt` images."""
    if isinstance(sources, (str, bytes)):
        raise TypeError("sources must be a sequence of image sources, not a single str or bytes")
    if len(sources) > policy.limit_per_prompt:
        raise refused(
            f"too many images: {len(sources)} given, at most {policy.limit_per_prompt} per request", "too_many_items"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """A new RGB image; transparent images are composited on white."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, _BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")
