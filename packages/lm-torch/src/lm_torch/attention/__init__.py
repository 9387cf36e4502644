"""Attention over the paged KV cache: one metadata type, one backend interface, a backend per device."""

from lm_torch.attention.metadata import AttentionMetadata
from lm_torch.attention.torch_backend import TorchAttentionBackend
from lm_torch.attention.triton_backend import TritonAttentionBackend  # imports triton only when it runs

__all__ = ["AttentionMetadata", "TorchAttentionBackend", "TritonAttentionBackend"]
