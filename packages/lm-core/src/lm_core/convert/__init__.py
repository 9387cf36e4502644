"""Conversion of other model formats to Hugging Face directories (GGUF so far)."""

from lm_core.convert.from_gguf import convert_gguf

__all__ = ["convert_gguf"]
