"""lm-core: the torch-free heart of lm-deploy (types, text handling, engine protocol, model resolution)."""

from lm_core.errors import GGUFConversionError, LMDeployError, ModelResolutionError
from lm_core.resolve import DEFAULT_MODEL, cache_dir, resolve_model

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "GGUFConversionError",
    "LMDeployError",
    "ModelResolutionError",
    "__version__",
    "cache_dir",
    "resolve_model",
]
