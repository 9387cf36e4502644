"""Per-family image and video preprocessing in torch (`load_processor(path)`), equal to transformers' processors.

Each family module registers its `VisionProcessor` subclass when imported; `processor_class` imports them all
(`base.FAMILY_MODULES`) on its first call.
"""

from __future__ import annotations

from lm_vl.processors.base import (
    VisionItem,
    VisionProcessor,
    load_processor,
    placeholder_spans,
    processor_class,
)

__all__ = ["VisionItem", "VisionProcessor", "load_processor", "placeholder_spans", "processor_class"]
