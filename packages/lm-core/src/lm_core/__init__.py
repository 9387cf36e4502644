"""lm-core: the torch-free heart of lm-deploy (types, text handling, engine protocol, pipeline, model resolution)."""

from lm_core.async_pipeline import AsyncPipeline
from lm_core.engine import Engine, EngineOutput, EngineRequest, EngineStats
from lm_core.errors import GGUFConversionError, LMDeployError, ModelResolutionError
from lm_core.generation_config import GenerationConfig
from lm_core.pipeline import Pipeline, Session, pipeline
from lm_core.resolve import DEFAULT_MODEL, cache_dir, resolve_model
from lm_core.response import Response

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "AsyncPipeline",
    "Engine",
    "EngineOutput",
    "EngineRequest",
    "EngineStats",
    "GGUFConversionError",
    "GenerationConfig",
    "LMDeployError",
    "ModelResolutionError",
    "Pipeline",
    "Response",
    "Session",
    "__version__",
    "cache_dir",
    "pipeline",
    "resolve_model",
]
