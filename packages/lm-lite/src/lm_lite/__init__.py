"""lm-lite: quantization (AWQ, GPTQ, SmoothQuant, calibration) writing standard checkpoints.

`import lm_lite` stays light (no torch): the functions load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what `__getattr__` loads on first use, declared for type checkers
    from lm_lite.api import auto_awq, auto_gptq, calibrate, rtn, smooth_quant
    from lm_lite.families import supported_architectures

__version__ = "0.1.0"
__all__ = ["auto_awq", "auto_gptq", "calibrate", "rtn", "smooth_quant", "supported_architectures"]


def __getattr__(name: str):
    if name in ("auto_awq", "auto_gptq", "calibrate", "rtn", "smooth_quant"):
        from lm_lite import api

        return getattr(api, name)
    if name == "supported_architectures":
        from lm_lite.families import supported_architectures

        return supported_architectures
    raise AttributeError(f"module 'lm_lite' has no attribute {name!r}")
