"""lm-vl: image and video loading for lm-deploy's vision models (per-model preprocessing is still to come).

`import lm_vl` stays light: the media loaders (and httpx, PIL) load on first use of a name below. No torch anywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what `__getattr__` loads on first use, declared for type checkers
    from lm_vl.media import (
        MediaError,
        MediaPolicy,
        aload_image,
        aload_images,
        aload_video,
        load_image,
        load_images,
        load_video,
    )

__version__ = "0.1.0"
__all__ = [
    "MediaError",
    "MediaPolicy",
    "aload_image",
    "aload_images",
    "aload_video",
    "load_image",
    "load_images",
    "load_video",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from lm_vl import media

        return getattr(media, name)
    raise AttributeError(f"module 'lm_vl' has no attribute {name!r}")
