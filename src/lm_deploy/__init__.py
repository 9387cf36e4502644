"""lm-deploy: the meta-package that installs the whole toolkit and the `lm` command."""

from lm_core import DEFAULT_MODEL, AsyncPipeline, GenerationConfig, Pipeline, Response, pipeline, resolve_model

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "AsyncPipeline",
    "GenerationConfig",
    "Pipeline",
    "Response",
    "__version__",
    "pipeline",
    "resolve_model",
]
