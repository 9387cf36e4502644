"""Secure loading of request media: images (and video frames) from URLs, data URLs, allowed paths, bytes and PIL.

`MediaPolicy` says what may be fetched and decoded (strict by default); `load_image`/`aload_image`/`load_images`
apply it and return RGB PIL images; `load_video` returns sampled RGB frames. Every refusal or failure is a
`MediaError` carrying the HTTP status (400 or 422), the request field and a reason code.
"""

from lm_vl.media.errors import MediaError
from lm_vl.media.image import ImageSource, aload_image, aload_images, decode_image, load_image, load_images
from lm_vl.media.policy import SUPPORTED_FORMATS, SUPPORTED_SCHEMES, MediaPolicy
from lm_vl.media.video import VideoSource, aload_video, load_video, sample_frame_indices

__all__ = [
    "SUPPORTED_FORMATS",
    "SUPPORTED_SCHEMES",
    "ImageSource",
    "MediaError",
    "MediaPolicy",
    "VideoSource",
    "aload_image",
    "aload_images",
    "aload_video",
    "decode_image",
    "load_image",
    "load_images",
    "load_video",
    "sample_frame_indices",
]
