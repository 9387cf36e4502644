"""Model implementations, one file per family, found by the Hugging Face architecture name."""

from lm_torch.models.registry import MODEL_REGISTRY, get_model_class, supported_architectures

__all__ = ["MODEL_REGISTRY", "get_model_class", "supported_architectures"]
