"""Attention backends behind one contract (`AttentionBackend`): plain torch (CPU, and the reference) and Triton
(CUDA)."""

from lm_torch.attention.base import AttentionBackend, AttentionState, StepMetadata
from lm_torch.attention.torch_backend import TorchAttentionBackend
from lm_torch.attention.triton_backend import TritonAttentionBackend

__all__ = ["AttentionBackend", "AttentionState", "StepMetadata", "TorchAttentionBackend", "TritonAttentionBackend"]
