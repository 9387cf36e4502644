"""lm-torch: the PyTorch inference engine of lm-deploy.

Paged KV cache, continuous batching, prefix caching, Triton kernels and CUDA graphs; it runs on the CPU too.
`TorchEngineConfig` imports no torch; `TorchEngine` imports it on first access.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

# When lm-torch began importing (torch's import follows): the first engine's start-up summary counts from here.
IMPORT_STARTED = time.perf_counter()

from lm_torch.config import TorchEngineConfig  # noqa: E402  (after the start time is taken)

if TYPE_CHECKING:
    from lm_torch.engine import TorchEngine

__version__ = "0.1.0"

__all__ = ["TorchEngine", "TorchEngineConfig", "__version__"]


def __getattr__(name: str) -> Any:
    # `import lm_torch` stays light (no torch) until the engine itself is asked for.
    if name == "TorchEngine":
        from lm_torch.engine import TorchEngine

        return TorchEngine
    raise AttributeError(f"module 'lm_torch' has no attribute {name!r}")
